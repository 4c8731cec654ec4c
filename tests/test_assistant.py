"""Tests of mmbook.assistant against independent references (brute force, scikit-learn, mmbook.vlm)."""

import math
import re

import numpy as np
import pytest
import torch
from sklearn.calibration import calibration_curve

from mmbook.assistant import (
    DOC_QUESTIONS,
    OUT_OF_SCOPE_QUESTIONS,
    SPOKEN_DOC_QUESTIONS,
    SPOKEN_VQA_QUESTIONS,
    Assistant,
    Reply,
    Router,
    TemplateRecognizer,
    add_noise,
    chat,
    chat_widget,
    dtw_distance,
    exact_match,
    expected_calibration_error,
    format_reply,
    normalize_answer,
    reliability_bins,
    synthesize_cached,
    utterance_features,
    vlm_answerer,
)
from mmbook.cache import CacheError
from mmbook.corpus import load_documents
from mmbook.data import shapes_scenes
from mmbook.retrieval import DocumentStore

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: tiny models run fastest on one thread


# ----------------------------------------------------------------------------- data
def test_question_sets():
    assert len(SPOKEN_VQA_QUESTIONS) == len(set(SPOKEN_VQA_QUESTIONS)) == 27
    assert set(SPOKEN_DOC_QUESTIONS) <= {q for q, _ in DOC_QUESTIONS}
    titles = {d.split("\n", 1)[0] for d in load_documents()}
    assert all(set(topics) <= titles for _, topics in DOC_QUESTIONS)
    assert len({q for q, _ in DOC_QUESTIONS}) == len(DOC_QUESTIONS) == 50 and len(OUT_OF_SCOPE_QUESTIONS) == 64
    assert len(set(OUT_OF_SCOPE_QUESTIONS)) == 64 and not set(OUT_OF_SCOPE_QUESTIONS) & {q for q, _ in DOC_QUESTIONS}
    generated = {q for _, q, _, k in shapes_scenes(300, seed=0).qa_pairs() if k != "relation"}
    assert generated <= set(SPOKEN_VQA_QUESTIONS)  # every non-relation generator question can be spoken


# ----------------------------------------------------------------------------- DTW
def _brute_force_dtw(x, y, band=None):
    """Minimum over every monotone path (steps (1,0), (0,1), (1,1)) inside the band, by enumeration."""
    L, M = len(x), len(y)
    best = math.inf

    def walk(i, j, total):
        nonlocal best
        total += float(np.linalg.norm(x[i] - y[j]))
        if (i, j) == (L - 1, M - 1):
            best = min(best, total)
            return
        for di, dj in ((1, 0), (0, 1), (1, 1)):
            if i + di < L and j + dj < M and (band is None or abs(i + di - j - dj) <= band):
                walk(i + di, j + dj, total)

    walk(0, 0, 0.0)
    return best / (L + M)


def test_dtw_equals_brute_force():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 3, generator=g, dtype=torch.float64)
    y = torch.randn(2, 5, 3, generator=g, dtype=torch.float64)
    ref = torch.tensor([[_brute_force_dtw(a.numpy(), b.numpy()) for b in y] for a in x], dtype=torch.float64)
    torch.testing.assert_close(dtw_distance(x, y), ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dtw_distance(x, y, chunk=1), ref, rtol=1e-12, atol=1e-12)  # chunking changes nothing
    banded = torch.tensor([[_brute_force_dtw(a.numpy(), b.numpy(), band=1) for b in y] for a in x],
                          dtype=torch.float64)
    torch.testing.assert_close(dtw_distance(x, y, band=1), banded, rtol=1e-12, atol=1e-12)
    assert (banded >= ref - 1e-12).all()  # the band only removes paths


def test_dtw_band_zero_is_linear_alignment_and_warping_helps():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 6, 2, generator=g, dtype=torch.float64)
    linear = (x[:, None] - x[None]).norm(dim=-1).sum(-1) / 12
    torch.testing.assert_close(dtw_distance(x, x, band=0), linear, rtol=1e-12, atol=1e-12)
    assert torch.equal(torch.diagonal(dtw_distance(x, x)), torch.zeros(4, dtype=torch.float64))
    # a time-stretched copy is closer under warping than under linear alignment
    base = torch.randn(1, 5, 2, generator=g, dtype=torch.float64)
    stretched = base.repeat_interleave(2, dim=1)[:, :10]
    assert dtw_distance(base, stretched).item() < 1e-12


def test_dtw_bad_inputs():
    with pytest.raises(ValueError, match="x must be"):
        dtw_distance(torch.randn(4, 3), torch.randn(2, 4, 3))
    with pytest.raises(ValueError, match="feature size"):
        dtw_distance(torch.randn(1, 4, 3), torch.randn(1, 4, 2))
    with pytest.raises(ValueError, match="band"):
        dtw_distance(torch.randn(1, 4, 3), torch.randn(1, 7, 3), band=2)


# ----------------------------------------------------------------------------- speech
def _chirp(f0, f1, seconds=0.6, sr=16000, pad=0.1):
    t = torch.arange(int(seconds * sr)) / sr
    phase = 2 * math.pi * (f0 * t + (f1 - f0) * t**2 / (2 * seconds))
    silence = torch.zeros(int(pad * sr))
    return torch.cat([silence, 0.5 * torch.sin(phase), silence])


def test_utterance_features_shape_and_normalisation():
    feats = utterance_features([_chirp(300, 2000), _chirp(300, 2000, seconds=1.2)], num_frames=20, n_mfcc=8)
    assert feats.shape == (2, 20, 8)
    torch.testing.assert_close(feats.mean(dim=1), torch.zeros(2, 8), rtol=0, atol=0.1)  # standardised per utterance
    # the same sweep at half the speed gives nearly the same time-normalised features
    assert (feats[0] - feats[1]).abs().mean() < 0.3
    with pytest.raises(ValueError, match="waveforms"):
        utterance_features([torch.zeros(100)])
    with pytest.raises(ValueError, match="num_frames"):
        utterance_features([_chirp(300, 2000)], num_frames=1)


def test_template_recognizer_on_chirps():
    sweeps = {"up": (300, 3000), "down": (3000, 300), "high": (2500, 2600), "low": (300, 400)}
    texts = [name for name in sweeps for _ in range(2)]
    refs = [_chirp(*sweeps[name], seconds=s) for name in sweeps for s in (0.5, 0.7)]
    rec = TemplateRecognizer(texts, refs, num_frames=24)
    assert rec.labels == list(sweeps)
    tests = [_chirp(*sweeps[name], seconds=0.9) for name in sweeps]  # an unseen duration
    heard, dist = rec.transcribe(tests)
    assert heard == list(sweeps) and dist.shape == (4,)
    assert rec.transcribe(rec.features(tests))[0] == heard  # features can be precomputed
    strict = TemplateRecognizer(texts, refs, num_frames=24, reject_distance=-1.0)
    assert strict.transcribe(tests)[0] == [None] * 4
    with pytest.raises(ValueError, match="one text per waveform"):
        TemplateRecognizer(["up"], refs)
    with pytest.raises(ValueError, match="features must have shape"):
        rec.label_distances(torch.randn(2, 5, 12))


def test_add_noise_reaches_the_snr():
    wave = _chirp(300, 2000, pad=0.0)
    noisy = add_noise(wave, 10.0, torch.Generator().manual_seed(0))
    snr = 10 * torch.log10(wave.pow(2).mean() / (noisy - wave).pow(2).mean())
    assert abs(snr.item() - 10.0) < 0.2
    with pytest.raises(ValueError, match="snr_db"):
        add_noise(wave, float("inf"))
    with pytest.raises(ValueError, match="waveform"):
        add_noise(wave[None], 10.0)


def test_synthesize_cached_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("MMBOOK_CACHE_DIR", str(tmp_path))
    requests = [{"text": "what colour is the circle?", "voice": "m1"}]
    first = synthesize_cached(requests)
    assert len(list(tmp_path.glob("speech_*.npz"))) == 1
    second = synthesize_cached(requests)  # from the cache
    assert torch.equal(first[0], second[0]) and first[0].dtype == torch.float32
    with pytest.raises(TypeError, match="requests"):
        synthesize_cached("what colour is the circle?")


def test_synthesize_cached_names_a_wrong_or_truncated_file(tmp_path, monkeypatch):
    monkeypatch.setenv("MMBOOK_CACHE_DIR", str(tmp_path))
    requests = [{"text": "what colour is the circle?", "voice": "m1"}, {"text": "how do while loops work?"}]
    waves = synthesize_cached(requests)
    (path,) = tmp_path.glob("speech_*.npz")
    good = path.read_bytes()
    # a well-formed npz with the wrong content (another file's waveforms) at this entry's name
    np.savez(path, a0=np.zeros(10, np.float32), a1=np.zeros(10, np.float32))
    with pytest.raises(CacheError, match=f"synthesize_cached: {re.escape(str(path))}"):
        synthesize_cached(requests)
    # a cache file of the right format whose payload lost its second half
    path.write_bytes(good[: len(good) - (len(good) - good.index(b"\n")) // 2])
    with pytest.raises(CacheError, match=f"synthesize_cached: {re.escape(str(path))} is truncated"):
        synthesize_cached(requests)
    path.unlink()  # deleted, it is rebuilt, with the same waveforms
    assert all(torch.equal(a, b) for a, b in zip(synthesize_cached(requests), waves, strict=True))


# ----------------------------------------------------------------------------- router
def test_router_routes_by_margin_and_abstains():
    vision = torch.tensor([[1.0, 0.0, 0.0]])
    docs = torch.tensor([[0.0, 1.0, 0.0]])
    router = Router({"vision": vision, "docs": docs}, {"vision": 0.8, "docs": 0.3})
    queries = torch.tensor([[1.0, 0.1, 0.0], [0.0, 1.0, 0.1], [0.0, 0.0, 1.0], [0.6, 0.5, 0.6]])
    routes, scores = router.route(queries)
    expected_scores = torch.nn.functional.normalize(queries, dim=-1)[:, :2]
    torch.testing.assert_close(scores, expected_scores, rtol=1e-6, atol=1e-6)
    # the last query is more similar to vision (0.6) than to docs (0.5), but only clears the docs threshold
    assert routes == ["vision", "docs", "abstain", "docs"]
    with pytest.raises(ValueError, match="thresholds"):
        Router({"vision": vision}, {"docs": 0.1})
    with pytest.raises(ValueError, match="exemplars"):
        Router({"pictures": vision}, {"pictures": 0.1})
    with pytest.raises(ValueError, match="queries"):
        router.scores(torch.randn(2, 4))


# ----------------------------------------------------------------------------- evaluation
def test_exact_match_and_normalisation():
    assert normalize_answer("The  Red, circle!") == "red circle"
    assert exact_match(["Red.", "a square", None], ["red", "circle", "blue"]) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="equal length"):
        exact_match(["red"], ["red", "blue"])
    with pytest.raises(TypeError, match="text"):
        normalize_answer(3)


def test_reliability_bins_match_sklearn_and_ece():
    g = torch.Generator().manual_seed(0)
    confidence = torch.rand(500, generator=g, dtype=torch.float64)
    correct = torch.rand(500, generator=g, dtype=torch.float64) < confidence**2  # over-confident on purpose
    bins = reliability_bins(confidence, correct, num_bins=10)
    prob_true, prob_pred = calibration_curve(correct.numpy(), confidence.numpy(), n_bins=10)
    full = bins.count > 0
    np.testing.assert_allclose(bins.accuracy[full].numpy(), prob_true, atol=1e-12)
    np.testing.assert_allclose(bins.confidence[full].numpy(), prob_pred, atol=1e-12)
    assert int(bins.count.sum()) == 500
    explicit = sum(int(n) / 500 * abs(float(a) - float(c))
                   for n, a, c in zip(bins.count, bins.accuracy, bins.confidence, strict=True) if n > 0)
    assert expected_calibration_error(confidence, correct) == pytest.approx(explicit, abs=1e-12)
    assert expected_calibration_error(confidence, correct) > 0.1
    # a perfectly calibrated constant predictor has ECE 0
    assert expected_calibration_error(torch.full((4,), 0.5), torch.tensor([1, 0, 1, 0])) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="confidence must lie"):
        reliability_bins(torch.tensor([1.5]), torch.tensor([1]))
    with pytest.raises(ValueError, match="correct must hold"):
        reliability_bins(torch.tensor([0.5]), torch.tensor([2]))
    with pytest.raises(ValueError, match="num_bins"):
        expected_calibration_error(confidence, correct, num_bins=0)


# ----------------------------------------------------------------------------- the VQA adapter
def test_vlm_answerer_matches_answer_questions_and_probabilities():
    from mmbook.vlm import VisionLanguageModel, answer_questions, shapes_vocab

    scenes = shapes_scenes(6, seed=3)
    vocab = shapes_vocab(scenes)
    torch.manual_seed(0)
    model = VisionLanguageModel(len(vocab), d_model=16, n_layer=1, n_head=2).eval()  # untrained is fine
    images = scenes.images.float() / 255
    questions = [scenes.questions[i][0][0] for i in range(6)]
    answers, confidence = vlm_answerer(model, vocab)(images, questions)
    assert answers == answer_questions(model, vocab, images, questions, max_new_tokens=4)
    assert confidence.shape == (6,) and ((confidence > 0) & (confidence <= 1)).all()
    with pytest.raises(TypeError, match="VisionLanguageModel"):
        vlm_answerer(torch.nn.Linear(2, 2), vocab)
    with pytest.raises(ValueError, match="one question per image"):
        vlm_answerer(model, vocab)(images, questions[:2])


# ----------------------------------------------------------------------------- the assistant
WORDS = ("colour", "shape", "many", "there", "function", "exception", "loop", "circle")


def _embed(texts):
    """A stub sentence embedding: counts of a few words (plus a constant so no vector is zero)."""
    return torch.tensor([[t.count(w) for w in WORDS] + [0.1] for t in texts], dtype=torch.float32)


def _stub_vqa(images, questions):
    answers = ["red" if "colour" in q else "three" for q in questions]
    return answers, torch.tensor([0.9 if "colour" in q else 0.3 for q in questions], dtype=torch.float64)


def _assistant(**kwargs):
    passages = ["function: how to define a function", "raise: raise an exception", "break: leave a loop"]
    store = DocumentStore(["function", "raise", "break"], passages, _embed(passages))
    router = Router({"vision": _embed(["what colour is the circle?", "how many shapes are there?"]),
                     "docs": store.embeddings}, {"vision": 0.6, "docs": 0.6})
    return Assistant(_embed, router, store, _stub_vqa, **kwargs)


def test_assistant_routes_answers_and_abstains():
    bot = _assistant(vqa_threshold=0.5)
    image = torch.rand(3, 32, 32)
    replies = bot.answer_many(["what colour is the circle?", "how do I define a function?", "what is tokyo?",
                               "how many shapes are there?", "what colour is the circle?"],
                              [image, None, image, image, None])
    assert [r.route for r in replies] == ["vision", "docs", "abstain", "vision", "vision"]
    assert replies[0] == Reply("vision", "red", pytest.approx(0.9), "Red.", None, "red")
    assert replies[1].answer == "function" and replies[1].text.startswith("From the Python documentation")
    assert replies[2].answer is None and "only answer" in replies[2].text
    assert replies[3].answer is None and replies[3].guess == "three"  # confidence 0.3 < 0.5: abstains
    assert replies[4].answer is None and "attach" in replies[4].text  # a picture question without a picture
    assert bot.ask("how do I define a function?") == replies[1]


def test_assistant_spoken_questions_and_bad_inputs():
    sweeps = {"what colour is the circle?": (300, 3000), "how do I define a function?": (3000, 300)}
    texts = [t for t in sweeps for _ in range(2)]
    refs = [_chirp(*sweeps[t], seconds=s) for t in sweeps for s in (0.5, 0.7)]
    bot = _assistant(recognizer=TemplateRecognizer(texts, refs, num_frames=24))
    reply = bot.ask(audio=_chirp(3000, 300, seconds=0.9))
    assert reply.transcript == "how do I define a function?" and reply.answer == "function"
    deaf = _assistant(recognizer=TemplateRecognizer(texts, refs, num_frames=24, reject_distance=-1.0))
    assert deaf.ask(audio=_chirp(3000, 300)).route == "abstain"
    with pytest.raises(ValueError, match="exactly one"):
        bot.ask("what colour is the circle?", audio=_chirp(300, 3000))
    with pytest.raises(ValueError, match="recognizer"):
        _assistant().ask(audio=_chirp(300, 3000))
    with pytest.raises(ValueError, match="images"):
        bot.answer_many(["a", "b"], [None])
    with pytest.raises(TypeError, match="router"):
        Assistant(_embed, None, bot.store, _stub_vqa)


def test_chat_plain_function_and_widget():
    bot = _assistant()
    image = torch.rand(3, 32, 32)
    line = chat(bot, "what colour is the circle?", image=image)
    assert line == "Red. [vision, confidence 0.90]"
    assert chat(bot, "what is tokyo?").startswith("Sorry, I can only answer")
    assert format_reply(Reply("docs", "raise", 0.5, "X.", "how?")) == '(heard: "how?") X. [docs, confidence 0.50]'
    with pytest.raises(TypeError, match="assistant"):
        chat(None, "hi")
    widget = chat_widget(bot, {"scene": image})
    (picture_row, ask_row, log) = widget.children
    choice, _ = picture_row.children
    box, button = ask_row.children
    choice.value = "scene"
    box.value = "what colour is the circle?"  # continuous_update=False: setting the value asks
    assert "Red. [vision, confidence 0.90]" in log.value and box.value == ""
    box.value = "how do I define a function?"
    assert log.value.count("<p>") == 2
    with pytest.raises(ValueError, match="images"):
        chat_widget(bot, {"bad": torch.rand(32, 32)})


def test_chat_widget_displays_with_a_static_picture_of_itself():
    """Where widgets cannot run (the HTML book, a notebook not run yet) its output shows HTML, not a repr."""
    widget = chat_widget(_assistant(), {"scene <1>": torch.rand(3, 32, 32), "scene 2": torch.rand(3, 32, 32)})
    bundle = widget._repr_mimebundle_()
    assert bundle["application/vnd.jupyter.widget-view+json"]["model_id"] == widget.model_id
    assert bundle["text/plain"] == "Chat box of the assistant (ipywidgets; run the notebook to use it), pictures: 2"
    page = bundle["text/html"]
    assert "VBox" not in page and "scene &lt;1&gt;" in page and "<li>scene 2</li>" in page
    (picture_row, ask_row, _) = widget.children
    assert picture_row.children[0].value in page and ask_row.children[0].placeholder in page


def test_chat_widget_degrades_without_ipywidgets(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_widgets(name, *args, **kwargs):
        if name == "ipywidgets":
            raise ImportError("no ipywidgets")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_widgets)
    assert chat_widget(_assistant()) is None



def test_nan_settings_never_silence_or_force_an_answer_and_helpers_name_the_callers_arguments():
    wave = torch.randn(4000) * 0.1
    with pytest.raises(ValueError, match="utterance_features: n_mfcc must be <= 39"):
        utterance_features([wave], n_mfcc=40)  # was mfcc's "got 41"
    with pytest.raises(ValueError, match=r"utterance_features: trim_ratio must be in \[0, 1\), got nan"):
        utterance_features([wave], trim_ratio=math.nan)
    with pytest.raises(ValueError, match=r"utterance_features: waveforms\[0\] contains NaN"):
        utterance_features([wave * math.nan])
    with pytest.raises(ValueError, match="TemplateRecognizer: reject_distance must be a finite number"):
        TemplateRecognizer(["a"], [wave], reject_distance=math.nan)  # rejected every utterance
    recognizer = TemplateRecognizer(["a", "b"], [wave, torch.randn(4000) * 0.1])
    with pytest.raises(ValueError, match="TemplateRecognizer.label_distances: features contains NaN"):
        recognizer.transcribe(torch.full((1, 40, 12), math.nan))
    exemplars = {"vision": torch.randn(3, 8), "docs": torch.randn(4, 8)}
    with pytest.raises(ValueError, match=r"Router: thresholds\['vision'\] must be a finite number"):
        Router(exemplars, {"vision": math.nan, "docs": 0.1})  # abstained on everything
    with pytest.raises(ValueError, match="Router.scores: queries contains NaN"):
        Router(exemplars, {"vision": 0.1, "docs": 0.1}).route(torch.full((1, 8), math.nan))
    with pytest.raises(ValueError, match="Assistant: vqa_threshold must be a finite number"):
        _assistant(vqa_threshold=math.nan)  # never abstained
    with pytest.raises(TypeError, match="add_noise: generator must be a torch.Generator or None, got int"):
        add_noise(wave, 10.0, generator=3)
