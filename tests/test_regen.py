"""tools/regen.py: what a regenerated notebook stores besides the outputs."""

import nbformat

from tools.regen import KERNEL_CONFIG, WIDGET_STATE, WIDGET_VIEW, _keep_displayed_widgets, _tag_intended_exceptions


def _model(name, **state):
    return {"model_name": name, "model_module": "@jupyter-widgets/controls", "model_module_version": "2.0.0",
            "state": {"_model_name": name, **state}}


def _notebook_with_widgets():
    nb = nbformat.v4.new_notebook()
    view = {WIDGET_VIEW: {"model_id": "box", "version_major": 2, "version_minor": 0}, "text/plain": "Chat box"}
    nb.cells = [nbformat.v4.new_code_cell("display(box)", execution_count=1,
                                          outputs=[nbformat.v4.new_output("display_data", data=view)])]
    nb.metadata["widgets"] = {WIDGET_STATE: {"version_major": 2, "version_minor": 0, "state": {
        "box": _model("VBoxModel", children=["IPY_MODEL_text", "IPY_MODEL_button"], layout="IPY_MODEL_l1"),
        "text": _model("TextModel", layout="IPY_MODEL_l2", style="IPY_MODEL_s2"),
        "button": _model("ButtonModel", layout="IPY_MODEL_l3"),
        "l1": _model("LayoutModel"), "l2": _model("LayoutModel"), "s2": _model("TextStyleModel"),
        "l3": _model("LayoutModel"),
        # a progress bar that was closed and whose output was replaced: nothing shows it any more
        "bar": _model("HBoxModel", children=["IPY_MODEL_bar_text"]), "bar_text": _model("HTMLModel"),
    }}}
    return nb


def test_only_displayed_widgets_and_what_they_refer_to_are_kept():
    nb = _notebook_with_widgets()
    _keep_displayed_widgets(nb)
    assert set(nb.metadata["widgets"][WIDGET_STATE]["state"]) == {"box", "text", "button", "l1", "l2", "s2", "l3"}
    nbformat.validate(nb)


def test_no_widget_metadata_when_no_output_shows_a_widget():
    nb = _notebook_with_widgets()
    nb.cells[0].outputs = [nbformat.v4.new_output("display_data", data={"text/plain": "epochs: 100%| 10/10"})]
    _keep_displayed_widgets(nb)
    assert "widgets" not in nb.metadata
    plain = nbformat.v4.new_notebook()
    _keep_displayed_widgets(plain)
    assert "widgets" not in plain.metadata


def test_raises_exception_tag_follows_the_comment():
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("# NBVAL_RAISES_EXCEPTION\nf(-1)"),
                nbformat.v4.new_code_cell("x = 1", metadata={"tags": ["raises-exception", "keep"]}),
                nbformat.v4.new_code_cell("y = 2", metadata={"tags": ["raises-exception"]})]
    _tag_intended_exceptions(nb)
    assert [c.metadata.get("tags") for c in nb.cells] == [["raises-exception"], ["keep"], None]


def test_kernels_get_encrypted_sockets():
    assert KERNEL_CONFIG.KernelManager.transport_encryption == "auto"
