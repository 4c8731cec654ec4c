import pytest

from mmbook.corpus import SNAPSHOT, load_corpus, load_documents, split_documents


def test_snapshot_is_committed_and_loads():
    assert SNAPSHOT.is_file()
    docs = load_documents()
    assert len(docs) == 79
    assert docs == sorted(docs, key=lambda d: d.split("\n", 1)[0])
    text = load_corpus()
    assert 400_000 < len(text) < 600_000
    assert "assignment statements" in text.lower()


def test_live_source_has_same_structure():
    live = load_documents("live")
    assert len(live) > 50 and all("\n" in d for d in live)


def test_split_is_deterministic_and_disjoint():
    docs = load_documents()
    a = split_documents(docs, (0.8, 0.1, 0.1), seed=0)
    b = split_documents(docs, (0.8, 0.1, 0.1), seed=0)
    assert a == b
    assert [len(p) for p in a] == [63, 8, 8]
    assert sorted(sum(a, [])) == sorted(docs)
    assert split_documents(docs, (0.5, 0.5), seed=1) != split_documents(docs, (0.5, 0.5), seed=2)


def test_bad_input():
    with pytest.raises(ValueError, match="source must be 'snapshot' or 'live', got 'web'"):
        load_documents("web")
    with pytest.raises(ValueError, match="sum to 1"):
        split_documents(["a", "b"], (0.5, 0.6))
    with pytest.raises(ValueError, match="non-empty sequence"):
        split_documents("abc")
    with pytest.raises(ValueError, match="need at least 3 documents"):
        split_documents(["a", "b"])


def test_split_documents_names_bad_fractions_and_documents():
    docs = ["a\nx", "b\ny", "c\nz", "d\nw"]
    with pytest.raises(ValueError, match=r"split_documents: fractions\[0\] must be a positive number, got nan"):
        split_documents(docs, (float("nan"), 1.0))  # was "cannot convert float NaN to integer"
    with pytest.raises(TypeError, match="split_documents: fractions must be a non-empty sequence of numbers"):
        split_documents(docs, "ab")
    with pytest.raises(TypeError, match=r"split_documents: fractions\[0\] must be a number, got bool"):
        split_documents(docs, (True,))
    with pytest.raises(ValueError, match="split_documents: documents must be a non-empty sequence of strings"):
        split_documents([1, 2, 3])
