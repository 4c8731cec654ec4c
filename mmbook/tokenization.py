"""Tokenization: a byte-level BPE tokenizer trained from scratch, and WordPiece's greedy longest match.

:class:`BPETokenizer` works on the UTF-8 *bytes* of a text, so its base vocabulary is the 256
possible byte values and every Unicode string -- Chinese, emoji, combining marks -- can be
encoded without an unknown token: ``decode(encode(s)) == s`` for every string ``s`` that UTF-8
can encode (any ``str`` free of lone surrogates). Training learns merges of adjacent token pairs,
most frequent pair first, with incremental pair-count updates so that a thousand merges over the
book's corpus take seconds.

Text is first cut into pieces by a GPT-2-style regular expression (:data:`GPT2_SPLIT_PATTERN`),
and merges never cross a piece boundary. *Special tokens* (``<|endoftext|>``, ``<|im_start|>`` ...) are cut out
of the text before that, matched longest first, never merged with their neighbours, and get ids of their own
after the merges. :meth:`BPETokenizer.encode_iterable` encodes a stream of text chunks (a file, line by line) in
bounded memory, and :meth:`BPETokenizer.from_merges` rebuilds a production byte-level vocabulary from its merge
list.

:func:`wordpiece_tokenize` is BERT's WordPiece encoding of one word: greedy longest-match-first
with ``##`` marking pieces that continue a word.
"""

from __future__ import annotations

import functools
import heapq
import json
import re
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Collection, Iterable, Iterator, Sequence
from itertools import pairwise
from pathlib import Path

from mmbook.checks import check_bool, check_index, check_instance, check_int

__all__ = [
    "GPT2_SPLIT_PATTERN",
    "BPETokenizer",
    "bytes_to_unicode",
    "merge_pair",
    "wordpiece_tokenize",
]

#: A simplified GPT-2 pre-tokenization pattern for Python's ``re`` module, which has no ``\p{L}``.
#: Alternatives, tried left to right at each position:
#: ``'(?:[sdmt]|ll|ve|re)`` English contractions ('s 't 'd 'm 'll 've 're);
#: `` ?[^\W\d_]+`` a run of letters (word characters that are neither digits nor ``_``), with at most
#: one leading space; `` ?\d+`` a run of digits; `` ?(?:[^\s\w]|_)+`` a run of other symbols
#: (punctuation, emoji, combining marks, ``_``); ``\s+(?!\S)`` whitespace, leaving the last space to
#: the next word; ``\s+`` any remaining whitespace. Every character falls into one of these, so
#: the pieces always concatenate back to the text.
GPT2_SPLIT_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+"""

_DECODE_ERRORS = ("strict", "replace", "ignore", "backslashreplace")
_FORMAT = "mmbook-bpe"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to 256 printable Unicode characters.

    Printable Latin-1 bytes map to themselves; the others (control characters, space, ...) map to
    ``chr(256 + k)`` in order, so the space byte 32 becomes ``'Ġ'`` and newline 10 becomes ``'Ċ'``.
    Byte-level tokenizers in the ``tokenizers`` library store their tokens in this alphabet.
    """
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def merge_pair(ids: Sequence[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replace every occurrence of ``pair`` in ``ids``, scanning left to right, by ``new_id``.

    Occurrences do not overlap: merging ``(a, a)`` in ``[a, a, a]`` gives ``[new_id, a]``.
    Shapes: ``ids`` is a sequence of length ``n``; the result has length ``n - (number of merges)``.
    """
    if not isinstance(pair, tuple) or len(pair) != 2 or not all(isinstance(i, int) for i in pair):
        raise ValueError(f"merge_pair: pair must be a tuple of two ids, got {pair!r}")
    if isinstance(new_id, bool) or not isinstance(new_id, int):
        raise TypeError(f"merge_pair: new_id must be an int, got {type(new_id).__name__}")
    a, b = pair
    out: list[int] = []
    i, n = 0, len(ids)
    while i < n:
        if i + 1 < n and ids[i] == a and ids[i + 1] == b:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


# One numeric character (Unicode categories Nd, Nl, No: '7', '²', '½', 'Ⅻ'), kept by re.split as a part of its own,
# as the `tokenizers` library's Digits(individual_digits=True) cuts them.
@functools.cache
def _digit_regex() -> re.Pattern[str]:
    return re.compile("([" + "".join(re.escape(chr(c)) for c in range(0x110000)
                                     if unicodedata.category(chr(c)) in ("Nd", "Nl", "No")) + "])")
_check_int = check_int  # the name the shown BPETokenizer.train uses
_BOOK_PATTERNS = (GPT2_SPLIT_PATTERN, None)


class BPETokenizer:
    """A byte-level byte-pair-encoding tokenizer.

    Token ids ``0..255`` are the single bytes; id ``256 + r`` is the token made by merge number
    ``r`` (``merges[r] = (left_id, right_id)``). An untrained tokenizer is a pure byte tokenizer
    with ``vocab_size == 256``.

    ``pattern`` is the pre-tokenization regular expression (Python ``re`` syntax; default
    :data:`GPT2_SPLIT_PATTERN`); ``None`` treats each text as a single piece, so merges may cross
    word boundaries (slow to train on long texts). ``split_digits=True`` first cuts every numeric
    character (Unicode categories Nd, Nl, No) into a piece of its own and applies ``pattern`` to the
    text between: SmolLM2's rule, so that numbers are read digit by digit.

    ``special_tokens`` is a sequence of distinct non-empty strings. They get the ids
    ``256 + len(merges) + k`` in the order given (after every merge, as GPT-2's ``<|endoftext|>`` is id
    50256), are cut out of every text before pre-tokenization -- the longest first where two could
    match at one position -- and are never part of a merge: training ignores their text, and a merge
    can never cross one.
    """

    def __init__(self, pattern: str | None = GPT2_SPLIT_PATTERN, *, special_tokens: Sequence[str] = (),
                 split_digits: bool = False) -> None:
        if pattern is not None and not isinstance(pattern, str):
            raise TypeError(f"BPETokenizer: pattern must be a str or None, got {type(pattern).__name__}")
        check_bool("split_digits", split_digits, "BPETokenizer")
        if isinstance(special_tokens, str) or not isinstance(special_tokens, Sequence):
            raise TypeError("BPETokenizer: special_tokens must be a sequence of str (a list or tuple), "
                            f"got {type(special_tokens).__name__}")
        for k, token in enumerate(special_tokens):
            if not isinstance(token, str) or not token:
                raise ValueError(f"BPETokenizer: special_tokens[{k}] must be a non-empty str, got {token!r}")
            _check_utf8(token, f"BPETokenizer: special_tokens[{k}]")
        if len(set(special_tokens)) != len(special_tokens):
            dup = next(t for t in special_tokens if list(special_tokens).count(t) > 1)
            raise ValueError(f"BPETokenizer: special_tokens must be distinct, {dup!r} appears twice")
        if pattern is not None:
            try:
                compiled = re.compile(pattern)
            except re.error as err:
                raise ValueError(f"BPETokenizer: pattern is not a valid regular expression ({err})") from None
            if compiled.match("") is not None:
                raise ValueError(f"BPETokenizer: pattern must not match the empty string, got {pattern!r}")
        self.pattern = pattern
        self._regex = None if pattern is None else re.compile(pattern)
        self.split_digits = split_digits
        self.special_tokens: tuple[str, ...] = tuple(special_tokens)
        # Longest first: where "<|im_start|>" and "<|im_start|>x" could both match, the longer one wins.
        ordered = sorted(self.special_tokens, key=lambda t: (-len(t), t))
        self._special_regex = re.compile("(" + "|".join(map(re.escape, ordered)) + ")") if ordered else None
        self.merges: list[tuple[int, int]] = []
        self.merge_counts: list[int] = []
        self._set_merges([], [])

    # ------------------------------------------------------------------ state
    def _set_merges(self, merges: list[tuple[int, int]], counts: list[int]) -> None:
        self.merges = list(merges)
        self.merge_counts = list(counts)
        self._ranks = {pair: rank for rank, pair in enumerate(self.merges)}
        tokens = [bytes([b]) for b in range(256)]
        for a, b in self.merges:
            tokens.append(tokens[a] + tokens[b])
        self._special_ids = {token: 256 + len(self.merges) + k for k, token in enumerate(self.special_tokens)}
        tokens.extend(token.encode("utf-8") for token in self.special_tokens)
        self._tokens = tokens

    @property
    def vocab_size(self) -> int:
        """Number of tokens: 256 bytes, one per merge, one per special token."""
        return 256 + len(self.merges) + len(self.special_tokens)

    @property
    def special_ids(self) -> dict[str, int]:
        """A fresh dict ``{special token: id}``."""
        return dict(self._special_ids)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def vocab(self) -> dict[int, bytes]:
        """A fresh dict ``{id: bytes of the token}`` of all ``vocab_size`` tokens."""
        return dict(enumerate(self._tokens))

    def __repr__(self) -> str:
        extra = f", special_tokens={len(self.special_tokens)}" if self.special_tokens else ""
        return (f"BPETokenizer(vocab_size={self.vocab_size}, "
                f"pattern={'None' if self.pattern is None else 'custom'}{extra})")

    # ------------------------------------------------------------- splitting
    def pre_tokenize(self, text: str) -> list[str]:
        """Cut ``text`` into the pieces that merges never cross; ``"".join(pieces) == text``."""
        if not isinstance(text, str):
            raise TypeError(f"pre_tokenize: text must be a str, got {type(text).__name__}")
        return [piece for part, special in self._split_special(text)
                for piece in ([part] if special else self._pieces(part))]

    def _pieces(self, text: str) -> list[str]:
        """Pre-tokenize ordinary text (no special tokens in it)."""
        if self.split_digits:
            out: list[str] = []
            digit = _digit_regex()
            for part in digit.split(text):
                if len(part) == 1 and digit.fullmatch(part):
                    out.append(part)
                elif part:
                    out.extend([part] if self._regex is None else self._regex.findall(part))
            return out
        if self._regex is None:
            return [text] if text else []
        return self._regex.findall(text)

    def _split_special(self, text: str) -> list[tuple[str, bool]]:
        """``text`` cut into ``(part, is_special)``: the special tokens and the ordinary text between them."""
        if self._special_regex is None:
            return [(text, False)] if text else []
        parts = self._special_regex.split(text)  # with one capturing group, odd positions are the matches
        return [(part, k % 2 == 1) for k, part in enumerate(parts) if part]

    # --------------------------------------------------------------- training
    def train(self, text: str | Iterable[str], vocab_size: int) -> BPETokenizer:
        """Learn ``vocab_size - 256`` merges from ``text`` (a string or an iterable of documents).

        Replaces any previous merges and returns ``self``. Each step merges the most frequent
        adjacent pair; ties go to the pair with the smallest ``(left_id, right_id)``. Pair counts
        are updated incrementally: a merge only revisits the distinct pieces that contain the pair.
        If the text runs out of pairs first, the vocabulary stays smaller than ``vocab_size``.
        """
        _check_int("vocab_size", vocab_size, "train")
        if vocab_size < 256:
            raise ValueError(f"train: vocab_size must be >= 256 (the byte alphabet), got {vocab_size}")
        if isinstance(text, str):
            documents: list[str] = [text]
        else:
            try:
                documents = list(text)
            except TypeError:
                raise TypeError(f"train: text must be a str or an iterable of str, got {type(text).__name__}") from None
            bad = next((d for d in documents if not isinstance(d, str)), None)
            if bad is not None:
                raise TypeError(f"train: every document must be a str, got {type(bad).__name__}")

        piece_counts: Counter[str] = Counter()
        for position, doc in enumerate(documents):
            _check_utf8(doc, f"train: document {position}" if len(documents) > 1 else "train: text")
            for part, special in self._split_special(doc):
                if not special:  # a special token's text is never merged
                    piece_counts.update(self._pieces(part))
        distinct = sorted(piece_counts)  # a fixed order, independent of hashing
        words = [list(piece.encode("utf-8")) for piece in distinct]
        freqs = [piece_counts[piece] for piece in distinct]

        pair_counts: defaultdict[tuple[int, int], int] = defaultdict(int)
        where: defaultdict[tuple[int, int], set[int]] = defaultdict(set)
        for w, (ids, f) in enumerate(zip(words, freqs, strict=True)):
            for pair in pairwise(ids):
                pair_counts[pair] += f
                where[pair].add(w)
        heap = [(-count, pair) for pair, count in pair_counts.items()]
        heapq.heapify(heap)

        merges: list[tuple[int, int]] = []
        counts: list[int] = []
        while len(merges) < vocab_size - 256 and heap:
            neg_count, pair = heapq.heappop(heap)
            if pair_counts.get(pair, 0) != -neg_count or neg_count == 0:
                continue  # a stale heap entry: the pair's count has changed since it was pushed
            new_id = 256 + len(merges)
            merges.append(pair)
            counts.append(-neg_count)
            delta: defaultdict[tuple[int, int], int] = defaultdict(int)
            for w in where.pop(pair):
                ids, f = words[w], freqs[w]
                new_ids = merge_pair(ids, pair, new_id)
                if len(new_ids) == len(ids):
                    continue  # stale index entry: the pair no longer occurs in this piece
                for p in pairwise(ids):
                    delta[p] -= f
                for p in pairwise(new_ids):
                    delta[p] += f
                    where[p].add(w)
                words[w] = new_ids
            for p, d in delta.items():
                if d:
                    pair_counts[p] += d
                    if pair_counts[p] > 0:
                        heapq.heappush(heap, (-pair_counts[p], p))
                    else:
                        del pair_counts[p]
        self._set_merges(merges, counts)
        return self

    def truncated(self, vocab_size: int) -> BPETokenizer:
        """A new tokenizer with only the first ``vocab_size - 256`` merges.

        Training is greedy and sequential, so this equals training with ``vocab_size`` directly. Special
        tokens are kept (after the remaining merges); ``vocab_size`` counts bytes and merges only.
        """
        _check_int("vocab_size", vocab_size, "truncated")
        if not 256 <= vocab_size <= self.vocab_size:
            raise ValueError(f"truncated: vocab_size must be in [256, {self.vocab_size}], got {vocab_size}")
        if vocab_size > 256 + len(self.merges):
            raise ValueError(f"truncated: vocab_size counts merges only here; it must be at most "
                             f"{256 + len(self.merges)}, got {vocab_size}")
        out = BPETokenizer(self.pattern, special_tokens=self.special_tokens, split_digits=self.split_digits)
        n = vocab_size - 256
        out._set_merges(self.merges[:n], self.merge_counts[:n])
        return out

    # --------------------------------------------------------------- encoding
    def _encode_piece(self, data: bytes) -> list[int]:
        ids = list(data)
        ranks = self._ranks
        while len(ids) >= 2:
            best = min(pairwise(ids), key=lambda p: ranks.get(p, len(ranks)))
            rank = ranks.get(best)
            if rank is None:
                break  # no adjacent pair is a learned merge
            ids = merge_pair(ids, best, 256 + rank)
        return ids

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``: a list of ints in ``[0, vocab_size)``.

        Special tokens in ``text`` become their own ids. Within each pre-tokenized piece of the text between
        them, the earliest-learned merge among adjacent pairs is applied repeatedly, which reproduces the
        segmentation training arrived at.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode: text must be a str, got {type(text).__name__}")
        _check_utf8(text, "encode: text")
        return self._encode_checked(text, {})

    def _encode_checked(self, text: str, cache: dict[str, list[int]]) -> list[int]:
        out: list[int] = []
        for part, special in self._split_special(text):
            if special:
                out.append(self._special_ids[part])
                continue
            for piece in self._pieces(part):
                ids = cache.get(piece)
                if ids is None:
                    ids = cache[piece] = self._encode_piece(piece.encode("utf-8"))
                out.extend(ids)
        return out

    def encode_iterable(self, chunks: Iterable[str]) -> Iterator[int]:
        """Token ids of the concatenation of ``chunks`` (e.g. an open text file), produced lazily.

        The ids equal ``encode("".join(chunks))``, but memory stays bounded by a chunk plus the longest piece:
        everything up to the start of the buffer's last piece is final once more text follows (a piece is
        decided by the text up to its end and one character of look-ahead), so it is encoded and yielded; the
        last piece, and a buffer end that could still grow into a special token, wait for the next chunk.
        (With ``pattern=None`` the whole text is one piece and is held until the end.)
        """
        if isinstance(chunks, str):
            raise TypeError("encode_iterable: chunks must be an iterable of str (a file or a list), not a single "
                            "str; use encode for one string")
        if not isinstance(chunks, Iterable):
            raise TypeError(f"encode_iterable: chunks must be an iterable of str, got {type(chunks).__name__}")
        return self._encode_stream(chunks)

    def _encode_stream(self, chunks: Iterable[str]) -> Iterator[int]:
        cache: dict[str, list[int]] = {}
        buffer = ""
        longest_special = max((len(t) for t in self.special_tokens), default=0)
        for position, chunk in enumerate(chunks):
            if not isinstance(chunk, str):
                raise TypeError(f"encode_iterable: chunk {position} must be a str, got {type(chunk).__name__}")
            _check_utf8(chunk, f"encode_iterable: chunk {position}")
            buffer += chunk
            # Hold back a tail that may still be the start of a special token ...
            hold = 0
            for k in range(min(longest_special - 1, len(buffer)), 0, -1):
                if any(t.startswith(buffer[-k:]) for t in self.special_tokens):
                    hold = k
                    break
            ready = buffer[:-hold] if hold else buffer
            # ... and the last ordinary piece, which more text could extend.
            parts = self._split_special(ready)
            if parts and not parts[-1][1]:
                pieces = self._pieces(parts[-1][0])
                keep = len(pieces[-1]) if pieces else 0
                cut = len(ready) - keep
            else:
                cut = len(ready)
            if cut > 0:
                yield from self._encode_checked(buffer[:cut], cache)
                buffer = buffer[cut:]
        if buffer:
            yield from self._encode_checked(buffer, cache)

    @classmethod
    def from_merges(cls, merges: Sequence[tuple[bytes, bytes]], pattern: str | None = GPT2_SPLIT_PATTERN, *,
                    special_tokens: Sequence[str] = (), split_digits: bool = False) -> BPETokenizer:
        """A tokenizer from a production vocabulary's merge list, given as pairs of token bytes in rank order.

        Merge ``r`` joins the tokens whose bytes are ``merges[r][0]`` and ``merges[r][1]``; both must be single
        bytes or the result of an earlier merge. Our id of merge ``r`` is ``256 + r``; mapping ids to the
        production vocabulary's own ids goes through the token bytes (:meth:`token_bytes`).
        """
        fn = "from_merges"
        if isinstance(merges, (str, bytes)) or not isinstance(merges, Sequence):
            raise TypeError(f"{fn}: merges must be a sequence of (bytes, bytes) pairs, got {type(merges).__name__}")
        ids = {bytes([b]): b for b in range(256)}
        pairs: list[tuple[int, int]] = []
        for rank, pair in enumerate(merges):
            if not (isinstance(pair, tuple) and len(pair) == 2 and all(isinstance(x, bytes) for x in pair)):
                raise TypeError(f"{fn}: merges[{rank}] must be a (bytes, bytes) pair, got {pair!r}")
            left, right = pair
            if left not in ids or right not in ids:
                missing = left if left not in ids else right
                raise ValueError(f"{fn}: merges[{rank}] uses {missing!r}, which is neither a byte nor made by an "
                                 "earlier merge")
            if left + right in ids:
                raise ValueError(f"{fn}: merges[{rank}] makes {left + right!r} a second time; one id per token "
                                 "is all this tokenizer can represent")
            pairs.append((ids[left], ids[right]))
            ids[left + right] = 256 + rank
        tokenizer = cls(pattern, special_tokens=special_tokens, split_digits=split_digits)
        tokenizer._set_merges(pairs, [0] * len(pairs))
        return tokenizer

    def _check_ids(self, ids: object, fn: str) -> list[int]:
        if hasattr(ids, "tolist") and not isinstance(ids, list):
            ids = ids.tolist()  # a 1-D torch tensor or NumPy array
        if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
            raise TypeError(f"{fn}: ids must be a sequence of ints, got {type(ids).__name__}")
        ids = list(ids)
        for position, i in enumerate(ids):
            if isinstance(i, bool) or not isinstance(i, int):
                raise TypeError(f"{fn}: ids[{position}] must be an int, got {type(i).__name__}")
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"{fn}: ids[{position}] = {i} is outside the vocabulary [0, {self.vocab_size})")
        return ids

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """The raw bytes of the tokens ``ids`` (shape ``(seq,)``), concatenated."""
        return b"".join(self._tokens[i] for i in self._check_ids(ids, "decode_bytes"))

    def decode(self, ids: Sequence[int], errors: str = "replace") -> str:
        """The text of the tokens ``ids`` (a sequence, 1-D tensor or array of shape ``(seq,)``).

        The tokens' bytes are concatenated and decoded as UTF-8. A sequence that cuts a multi-byte
        character (as a language model's sample may) is not valid UTF-8; with the default
        ``errors="replace"`` each broken piece becomes U+FFFD '\ufffd', with ``"strict"`` it raises
        :class:`UnicodeDecodeError`; ``"ignore"`` and ``"backslashreplace"`` are also accepted.
        """
        if errors not in _DECODE_ERRORS:
            raise ValueError(f"decode: errors must be one of {_DECODE_ERRORS}, got {errors!r}")
        data = b"".join(self._tokens[i] for i in self._check_ids(ids, "decode"))
        return data.decode("utf-8", errors=errors)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of one token."""
        return self._tokens[check_index("token_id", token_id, "token_bytes", self.vocab_size)]

    # ---------------------------------------------------------------- storage
    def save(self, path: str | Path) -> None:
        """Write the pattern and merges as JSON to ``path``."""
        if not isinstance(path, (str, Path)):
            raise TypeError(f"save: path must be a str or pathlib.Path, got {type(path).__name__}")
        state = {
            "format": _FORMAT,
            "version": 1,
            "pattern": self.pattern,
            "merges": [list(pair) for pair in self.merges],
            "merge_counts": self.merge_counts,
            "special_tokens": list(self.special_tokens),
            "split_digits": self.split_digits,
        }
        Path(path).write_text(json.dumps(state), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path, *, trust_pattern: bool = False) -> BPETokenizer:
        """Read a tokenizer written by :meth:`save`.

        The file's pre-tokenization pattern must be one the book defines (:data:`GPT2_SPLIT_PATTERN` or
        ``None``): a regular expression read from a file could make :meth:`encode` run for ever
        (catastrophic backtracking, e.g. ``(a+)+$`` on ``"aaaa...!"``). Pass ``trust_pattern=True`` to
        load any other pattern from a file you wrote yourself.
        """
        check_bool("trust_pattern", trust_pattern, "load")
        if not isinstance(path, (str, Path)):
            raise TypeError(f"load: path must be a str or pathlib.Path, got {type(path).__name__}")
        try:
            state = json.loads(Path(path).read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"load: {Path(path).name} is not valid JSON ({err})") from None
        if not isinstance(state, dict) or state.get("format") != _FORMAT:
            raise ValueError(f"load: {Path(path).name} is not an {_FORMAT} file")
        merges = state.get("merges")
        if not isinstance(merges, list):
            raise ValueError("load: 'merges' must be a list of [left_id, right_id] pairs")
        pairs: list[tuple[int, int]] = []
        for rank, pair in enumerate(merges):
            ok = (isinstance(pair, list) and len(pair) == 2
                  and all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 256 + rank for i in pair))
            if not ok:
                raise ValueError(f"load: merge {rank} must be two ids below {256 + rank}, got {pair!r}")
            pairs.append((pair[0], pair[1]))
        counts = state.get("merge_counts") or []
        if not isinstance(counts, list) or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0
                                                   for c in counts):
            raise ValueError("load: 'merge_counts' must be a list of counts >= 0")
        if len(counts) not in (0, len(pairs)):
            raise ValueError(f"load: merge_counts has {len(counts)} entries for {len(pairs)} merges")
        pattern = state.get("pattern")
        if pattern is not None and not isinstance(pattern, str):
            raise ValueError(f"load: 'pattern' must be a str or null, got {type(pattern).__name__}")
        if pattern not in _BOOK_PATTERNS and not trust_pattern:
            raise ValueError(
                f"load: {Path(path).name} holds a pre-tokenization pattern the book does not define ({pattern!r}); "
                "a regular expression from a file can make encode run for ever. "
                "Pass trust_pattern=True if you wrote the file yourself"
            )
        special = state.get("special_tokens", [])
        if not isinstance(special, list):
            raise ValueError(f"load: 'special_tokens' must be a list of str, got {type(special).__name__}")
        split_digits = state.get("split_digits", False)
        if not isinstance(split_digits, bool):
            raise ValueError(f"load: 'split_digits' must be true or false, got {split_digits!r}")
        try:
            tokenizer = cls(pattern, special_tokens=special, split_digits=split_digits)
        except (TypeError, ValueError) as err:
            raise ValueError(f"load: {Path(path).name}: {err}") from None
        tokenizer._set_merges(pairs, [int(c) for c in counts])
        return tokenizer


def _check_utf8(text: str, where: str) -> None:
    """Raise a clear ValueError if ``text`` holds a lone surrogate, which UTF-8 cannot encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(
            f"{where} holds a lone surrogate U+{ord(text[err.start]):04X} at position {err.start}, "
            "which UTF-8 cannot encode"
        ) from None


def wordpiece_tokenize(
    word: str,
    vocab: Collection[str],
    unk_token: str = "[UNK]",
    prefix: str = "##",
    max_input_chars_per_word: int = 100,
) -> list[str]:
    """WordPiece tokens of one word (no spaces): greedy longest-match-first, as in BERT.

    From the current position, take the longest substring that is in ``vocab`` (written with
    ``prefix`` unless it starts the word) and move past it. If no substring matches, or the word
    is longer than ``max_input_chars_per_word``, the whole word becomes ``[unk_token]``.
    """
    if not isinstance(word, str):
        raise TypeError(f"wordpiece_tokenize: word must be a str, got {type(word).__name__}")
    if not isinstance(vocab, Collection) or isinstance(vocab, str):
        raise TypeError(f"wordpiece_tokenize: vocab must be a collection of str, got {type(vocab).__name__}")
    if any(ch.isspace() for ch in word):
        raise ValueError(f"wordpiece_tokenize: word must not contain whitespace, got {word!r}")
    _check_int("max_input_chars_per_word", max_input_chars_per_word, "wordpiece_tokenize", 1)
    check_instance("unk_token", unk_token, "wordpiece_tokenize", str, "a str")
    check_instance("prefix", prefix, "wordpiece_tokenize", str, "a str")
    if len(word) > max_input_chars_per_word:
        return [unk_token]
    tokens: list[str] = []
    start = 0
    while start < len(word):
        end = len(word)
        while end > start:
            candidate = word[start:end] if start == 0 else prefix + word[start:end]
            if candidate in vocab:
                break
            end -= 1
        if end == start:
            return [unk_token]
        tokens.append(candidate)
        start = end
    return tokens
