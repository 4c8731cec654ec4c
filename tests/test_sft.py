"""Unit tests of mmbook.sft (chat tokenization with an assistant-only mask, packing, the instruction set)."""

import pytest
import torch

import mmbook
from mmbook.chat import chatml_prompt
from mmbook.decoder import Decoder, DecoderConfig
from mmbook.sft import (
    TASKS,
    ChatByteTokenizer,
    PackedBatch,
    chat_segments,
    document_mask,
    evaluate_instructions,
    format_ok,
    instruction_dataset,
    make_words,
    pack_examples,
    packed_forward,
    packed_hidden,
    sft_targets,
    tokenize_chat,
    train_sft,
)

TOK = ChatByteTokenizer()
CHAT = [{"role": "user", "content": "Capitals: abc"}, {"role": "assistant", "content": "Answer: ABC"}]


def _model(vocab=258, seed=0):
    mmbook.set_seed(seed)
    return Decoder(DecoderConfig(vocab_size=vocab, max_seq_len=64, n_layer=2, n_head=2, n_kv_head=1, d_model=16))


def test_byte_tokenizer_round_trip_and_special_ids():
    text = chatml_prompt(CHAT, False, default_system=None)
    ids = TOK.encode(text)
    assert ids[0] == 256 and ids.count(257) == 2 and ids.count(256) == 2 and max(ids) == 257
    assert TOK.decode(ids) == text and TOK.decode(torch.tensor(ids)) == text
    with pytest.raises(TypeError, match="text"):
        TOK.encode(b"bytes")
    with pytest.raises(ValueError, match="ids"):
        TOK.decode([258])
    with pytest.raises(ValueError, match="ids"):
        TOK.decode([-1])


def test_segments_add_up_and_mask_covers_only_answers():
    for system in (None, "Be brief."):
        for gen in (True, False):
            segs = chat_segments(CHAT, gen, system)
            assert "".join(s for s, _ in segs) == chatml_prompt(CHAT, gen, system)
    ids, mask = tokenize_chat(CHAT, TOK.encode)
    assert ids.dtype == torch.long and mask.dtype == torch.bool and ids.shape == mask.shape
    assert TOK.decode(ids[mask]) == "Answer: ABC<|im_end|>"
    assert ids.tolist() == TOK.encode(chatml_prompt(CHAT, False, None))
    with pytest.raises(TypeError, match="encode"):
        tokenize_chat(CHAT, "not a function")
    with pytest.raises(ValueError, match="encode must return"):
        tokenize_chat(CHAT, lambda s: [-1])
    with pytest.raises(ValueError, match="messages"):
        tokenize_chat([{"role": "robot", "content": "x"}], TOK.encode)


def test_sft_targets_shift_and_ignore():
    ids = torch.tensor([5, 6, 7, 8])
    mask = torch.tensor([False, False, True, True])
    assert sft_targets(ids, mask).tolist() == [-100, 7, 8, -100]
    assert sft_targets(ids[None], mask[None]).tolist() == [[-100, 7, 8, -100]]
    with pytest.raises(ValueError, match="mask"):
        sft_targets(ids, mask[:3])
    with pytest.raises(ValueError, match="mask"):
        sft_targets(ids, mask.long())
    with pytest.raises(TypeError, match="ids"):
        sft_targets(ids.float(), mask)


def test_masked_positions_get_zero_gradient():
    model = _model()
    ids, mask = tokenize_chat(CHAT, TOK.encode)
    emb = model.embed_tokens(ids[None]).detach().requires_grad_(True)
    # gradient of the loss with respect to the logits is zero wherever the target is -100
    logits = model.lm_head(model.norm(emb)).detach().requires_grad_(True)
    targets = sft_targets(ids, mask)
    loss = torch.nn.functional.cross_entropy(logits[0], targets, ignore_index=-100)
    loss.backward()
    assert torch.equal(logits.grad[0][targets == -100], torch.zeros_like(logits.grad[0][targets == -100]))
    assert bool((logits.grad[0][targets != -100].abs().sum(-1) > 0).all())


def test_pack_examples_layout():
    convs = instruction_dataset(["first", "last"], ["abc", "hello"])
    ex = [tokenize_chat(c, TOK.encode) for c in convs]
    lengths = [e[0].numel() for e in ex]
    seq_len = lengths[0] + lengths[1] + 1
    batch = pack_examples(ex, seq_len, pad_id=0)
    assert isinstance(batch, PackedBatch) and batch.ids.shape[1] == seq_len
    assert batch.doc_ids[0, : lengths[0]].eq(0).all()
    assert batch.doc_ids[0, lengths[0]: lengths[0] + lengths[1]].eq(1).all()
    assert batch.positions[0, lengths[0]] == 0 and batch.doc_ids[0, -1] == -1 and batch.targets[0, -1] == -100
    assert torch.equal(batch.ids[0, : lengths[0]], ex[0][0])
    with pytest.raises(ValueError, match="seq_len"):
        pack_examples(ex, 5)
    with pytest.raises(TypeError, match="examples"):
        pack_examples([], 10)
    with pytest.raises(ValueError, match="seq_len"):
        pack_examples(ex, 0)


def test_document_mask_is_block_diagonal_and_causal():
    m = document_mask(torch.tensor([[0, 0, 1, 1, -1]]))
    expected = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 0, 1]])
    assert torch.equal(m[0], expected.bool())
    with pytest.raises(ValueError, match="doc_ids"):
        document_mask(torch.tensor([0, 1]))


def test_packed_forward_equals_separate_runs(one_thread):
    model = _model().double()
    convs = instruction_dataset(["upper", "double", "first"], ["abc", "wxyz"])
    ex = [tokenize_chat(c, TOK.encode) for c in convs]
    batch = pack_examples(ex, 100)
    out = packed_forward(model, batch.ids, batch.positions, batch.doc_ids, batch.targets)
    for r in range(batch.ids.shape[0]):
        for d in range(int(batch.doc_ids[r].max()) + 1):
            sel = batch.doc_ids[r] == d
            alone = model(batch.ids[r][sel][None]).logits
            torch.testing.assert_close(out.logits[r][sel][None], alone, rtol=0, atol=1e-10)
    total = sum(int((sft_targets(i, m) != -100).sum()) for i, m in ex)
    assert total == int((batch.targets != -100).sum())
    with pytest.raises(ValueError, match="positions"):
        packed_forward(model, batch.ids, batch.positions[:, :3], batch.doc_ids)
    with pytest.raises(ValueError, match="positions must be >= 0"):
        packed_forward(model, batch.ids, batch.positions - 1, batch.doc_ids)
    with pytest.raises(TypeError, match="model"):
        packed_forward(torch.nn.Linear(2, 2), batch.ids, batch.positions, batch.doc_ids)


def test_words_and_dataset():
    w = make_words(50, seed=1)
    assert len(set(w)) == 50 and all(3 <= len(x) <= 6 and x.isalpha() for x in w)
    assert make_words(50, seed=1) == w
    convs = instruction_dataset(["reverse"], ["abc"])
    assert convs == [[{"role": "user", "content": "Reverse: abc"}, {"role": "assistant", "content": "Answer: cba"}]]
    assert all(format_ok(f"Answer: {fn('hello')}<|im_end|>") for _, fn in TASKS.values())
    assert not format_ok("Answer: abc") and not format_ok("abc<|im_end|>") and not format_ok("Answer:  a<|im_end|>")
    with pytest.raises(ValueError, match="tasks"):
        instruction_dataset(["nope"], ["abc"])
    with pytest.raises(ValueError, match="words"):
        instruction_dataset(["first"], ["Abc"])
    with pytest.raises(ValueError, match="distinct"):
        make_words(20000, seed=0, min_len=3, max_len=3)
    with pytest.raises(TypeError, match="response"):
        format_ok(3)


def test_train_sft_learns_and_evaluate(one_thread):
    model = _model()
    convs = instruction_dataset(["first"], make_words(30, seed=2))
    batch = pack_examples([tokenize_chat(c, TOK.encode) for c in convs], 64)
    em0, fmt0, _ = evaluate_instructions(model, TOK, convs[:4], max_new_tokens=12)
    losses = train_sft(model, batch, steps=60, batch_size=4, lr=1e-2, seed=1)
    assert len(losses) == 60 and losses[-1] < losses[0] - 1.0
    assert not model.training  # left in eval mode
    em, fmt, responses = evaluate_instructions(model, TOK, convs[:4], max_new_tokens=12)
    assert fmt0 == 0.0 and 0.0 <= em <= fmt <= 1.0 and len(responses) == 4
    with pytest.raises(ValueError, match="trainable"):
        for p in model.parameters():
            p.requires_grad_(False)
        train_sft(model, batch, steps=1, batch_size=1, lr=1e-3)
    with pytest.raises(TypeError, match="batch"):
        train_sft(model, (1, 2), steps=1, batch_size=1, lr=1e-3)
    with pytest.raises(ValueError, match="conversations"):
        evaluate_instructions(model, TOK, [])


def test_packed_forward_from_a_middle_layer_and_target_logits(one_thread):
    model = _model().double()
    convs = instruction_dataset(["upper", "double"], ["abc", "wxyz"])
    batch = pack_examples([tokenize_chat(c, TOK.encode) for c in convs], 100)
    full = packed_forward(model, batch.ids, batch.positions, batch.doc_ids, batch.targets)
    hidden = packed_hidden(model, batch.ids, batch.positions, batch.doc_ids, 1)
    tail = packed_forward(model, batch.ids, batch.positions, batch.doc_ids, batch.targets, start_layer=1,
                          hidden=hidden, all_logits=False)
    keep = batch.targets != -100
    torch.testing.assert_close(tail.logits, full.logits[keep], rtol=0, atol=1e-12)
    torch.testing.assert_close(tail.loss, full.loss, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="hidden must have shape"):
        packed_forward(model, batch.ids, batch.positions, batch.doc_ids, start_layer=1, hidden=hidden[:, :3])
    with pytest.raises(ValueError, match="needs targets"):
        packed_forward(model, batch.ids, batch.positions, batch.doc_ids, all_logits=False)
    with pytest.raises(ValueError, match="n_layers"):
        packed_hidden(model, batch.ids, batch.positions, batch.doc_ids, 3)
    with pytest.raises(ValueError, match="frozen"):
        train_sft(model, batch, steps=1, batch_size=1, lr=1e-3, start_layer=1)


def test_base_cache_key_carries_a_training_code_version():
    import inspect

    import mmbook.sft as sft

    assert isinstance(sft.BASE_VERSION, str) and sft.BASE_VERSION
    assert '"version": BASE_VERSION' in inspect.getsource(sft.pretrained_chat_base)


def test_base_cache_key_records_the_numerics(monkeypatch, tmp_path):
    import json

    import mmbook.sft as sft

    key = sft.numerics_key()
    assert key["threads"] == torch.get_num_threads() and key["dtype"] == "torch.float32"
    assert key["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    monkeypatch.setenv("MKL_CBWR", "COMPATIBLE")
    assert sft.numerics_key()["MKL_CBWR"] == "COMPATIBLE" and sft.numerics_key() != key
    # The base's cache file names the numerics it was trained with: another code path gets another entry.
    monkeypatch.setenv("MMBOOK_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(sft, "BASE_RECIPE", {**sft.BASE_RECIPE, "steps": 2, "warmup": 1})
    sft.pretrained_chat_base(0)
    (entry,) = tmp_path.glob("chat_base_*.pt")
    with open(entry, "rb") as f:
        assert json.loads(f.readline())["key"]["numerics"] == sft.numerics_key()
    other = "DEFAULT" if key["cpu_capability"] != "DEFAULT" else "AVX2"
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: other)
    sft.pretrained_chat_base(0)
    assert len(list(tmp_path.glob("chat_base_*.pt"))) == 2


def test_pack_examples_names_the_bad_example():
    convs = instruction_dataset(["first", "last"], ["abc", "hello"])
    ex = [tokenize_chat(c, TOK.encode) for c in convs]
    bad = (ex[1][0], ex[1][1].long())
    with pytest.raises(ValueError, match=r"pack_examples: examples\[1\].*mask"):
        pack_examples([ex[0], bad], 128)
    with pytest.raises(ValueError, match="pad_id"):
        pack_examples(ex, 128, pad_id=-1)


def test_bad_inputs_of_the_base_and_the_evaluation_are_named():
    from mmbook.sft import corpus_chat_stream, pretrained_chat_base

    with pytest.raises(ValueError, match="pretrained_chat_base: seed"):
        pretrained_chat_base(seed=-1)
    with pytest.raises(TypeError, match="pretrained_chat_base: seed"):
        pretrained_chat_base(seed=True)
    with pytest.raises(TypeError, match="corpus_chat_stream: tokenizer"):
        corpus_chat_stream(tokenizer="x")
    model = _model()
    with pytest.raises(ValueError, match="evaluate_instructions: max_new_tokens"):
        evaluate_instructions(model, TOK, [CHAT], max_new_tokens=0)
    with pytest.raises(TypeError, match="evaluate_instructions: tokenizer"):
        evaluate_instructions(model, "bytes", [CHAT])
    with pytest.raises(ValueError, match="evaluate_instructions: conversations"):
        evaluate_instructions(model, TOK, [])


def test_evaluation_rejects_a_chat_without_its_reference_answer():
    model = _model()
    with pytest.raises(ValueError, match=r"evaluate_instructions: conversations\[1\]"):
        evaluate_instructions(model, TOK, [CHAT, CHAT[:1]])
    with pytest.raises(ValueError, match=r"evaluate_instructions: conversations\[0\]"):
        evaluate_instructions(model, TOK, [[CHAT[1], CHAT[0]]])
    with pytest.raises(ValueError, match="evaluate_instructions: conversations"):
        evaluate_instructions(model, TOK, "Capitals: abc")


def test_packed_forward_without_any_target_is_rejected():
    model = _model()
    batch = pack_examples([tokenize_chat(CHAT, TOK.encode)], 64)
    empty = torch.full_like(batch.targets, -100)
    with pytest.raises(ValueError, match="packed_forward: targets has no position"):
        packed_forward(model, batch.ids, batch.positions, batch.doc_ids, empty, all_logits=False)


def test_train_sft_callback_schedule_and_bad_arguments(one_thread):
    model = _model()
    batch = pack_examples([tokenize_chat(c, TOK.encode) for c in instruction_dataset(["first"], ["abc", "wxyz"])], 64)
    seen = []

    def record(step, m):
        seen.append((step, m.training))

    losses = train_sft(model, batch, steps=12, batch_size=2, lr=1e-3, warmup=2, seed=0, callback=record, every=5)
    assert len(losses) == 12 and seen == [(5, False), (10, False)] and not model.training
    with pytest.raises(ValueError, match="train_sft: warmup must be smaller than steps"):
        train_sft(model, batch, steps=5, batch_size=2, lr=1e-3, warmup=5)
    with pytest.raises(TypeError, match="train_sft: callback"):
        train_sft(model, batch, steps=12, batch_size=2, lr=1e-3, warmup=2, callback="not a function")
    with pytest.raises(ValueError, match="train_sft: every"):
        train_sft(model, batch, steps=12, batch_size=2, lr=1e-3, warmup=2, every=0)


def test_packed_forward_runs_the_decoders_own_blocks_with_moe_router_logits(one_thread):
    mmbook.set_seed(1)
    config = DecoderConfig(vocab_size=258, max_seq_len=128, n_layer=2, n_head=2, d_model=16, num_experts=4, top_k=2,
                           capacity_factor=None)
    model = Decoder(config).double().eval()
    ex = [tokenize_chat(c, TOK.encode) for c in instruction_dataset(["upper", "first"], ["abc", "wxyz"])]
    batch = pack_examples(ex, 128)
    out = packed_forward(model, batch.ids, batch.positions, batch.doc_ids, batch.targets)
    # The routers' logits come back, one (batch * T, num_experts) tensor per layer, as from Decoder.forward.
    assert out.router_logits is not None and len(out.router_logits) == 2
    assert out.router_logits[0].shape == (batch.ids.numel(), 4)
    sel = batch.doc_ids[0] == 0
    alone = model(batch.ids[0][sel][None])
    torch.testing.assert_close(out.logits[0][sel][None], alone.logits, rtol=0, atol=1e-10)
    torch.testing.assert_close(out.router_logits[0].view(*batch.ids.shape, 4)[0][sel], alone.router_logits[0],
                               rtol=0, atol=1e-10)
    # train_sft adds the load-balancing loss: with weight 0 and with 0.5 the trained weights differ.
    runs = []
    for weight in (0.0, 0.5):
        m = Decoder(config)
        m.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
        train_sft(m, batch, steps=3, batch_size=2, lr=1e-2, warmup=1, seed=0, aux_loss_weight=weight)
        runs.append(m.layers[0].mlp.gate.weight.detach().clone())
    assert not torch.equal(*runs)
    with pytest.raises(ValueError, match="train_sft: aux_loss_weight"):
        train_sft(model, batch, steps=3, batch_size=2, lr=1e-2, warmup=1, aux_loss_weight=-1.0)


def test_attention_positions_and_mask_keywords_are_checked():
    model = _model().double()
    block = model.layers[0]
    x = torch.randn(1, 5, 16, dtype=torch.float64, generator=mmbook.torch_generator(3))
    causal = torch.ones(5, 5, dtype=torch.bool).tril()[None, None]
    torch.testing.assert_close(block(x, positions=torch.arange(5), attn_mask=causal)[0], block(x)[0], rtol=0,
                               atol=1e-12)
    with pytest.raises(ValueError, match="attn_mask"):
        block(x, attn_mask=causal.float())
    with pytest.raises(ValueError, match="attn_mask"):
        block(x, attn_mask=causal[..., :4])
    with pytest.raises(ValueError, match="positions"):
        block(x, positions=torch.arange(4))
