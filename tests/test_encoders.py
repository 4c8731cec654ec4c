import dataclasses

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn

import mmbook
from mmbook.encoders import (
    GRU,
    BertConfig,
    BertEncoder,
    BertForMaskedLM,
    EncoderLayer,
    EncoderOutput,
    GRUCell,
    GRUEncoder,
    SequenceClassifier,
    export_hf_bert_weights,
    load_hf_bert_weights,
    mask_tokens,
    mean_pool,
    sentence_embeddings,
)

transformers.logging.set_verbosity_error()

# float64 on both sides: the same arithmetic in a different order agrees to ~1e-15
TIGHT = {"rtol": 0.0, "atol": 1e-12}


def _hf_config(**overrides):
    kwargs = dict(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=32,
                  max_position_embeddings=24)
    kwargs.update(overrides)
    return transformers.BertConfig(**kwargs)


def _batch():
    mmbook.set_seed(0)
    ids = torch.randint(5, 40, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 5:] = 0
    mask[2, 7:] = 0
    types = torch.zeros_like(ids)
    types[:, 4:] = 1
    return ids, mask, types


# ------------------------------------------------------------------------------------- GRU


def test_gru_cell_matches_torch():
    mmbook.set_seed(0)
    ref = nn.GRUCell(5, 7, dtype=torch.float64)
    cell = GRUCell(5, 7).double()
    cell.load_state_dict(ref.state_dict())
    x, h = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 7, dtype=torch.float64)
    torch.testing.assert_close(cell(x, h), ref(x, h), **TIGHT)
    torch.testing.assert_close(cell(x), ref(x), **TIGHT)


def test_gru_matches_torch_with_and_without_lengths():
    mmbook.set_seed(0)
    ref = nn.GRU(5, 7, num_layers=2, batch_first=True, dtype=torch.float64)
    ours = GRU(5, 7, num_layers=2).double().load_from_torch(ref)
    x = torch.randn(3, 6, 5, dtype=torch.float64)
    h0 = torch.randn(2, 3, 7, dtype=torch.float64)
    out, h = ours(x, h0=h0)
    ref_out, ref_h = ref(x, h0)
    torch.testing.assert_close(out, ref_out, **TIGHT)
    torch.testing.assert_close(h, ref_h, **TIGHT)
    lengths = torch.tensor([6, 2, 4])
    packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    ref_out, ref_h = ref(packed)
    ref_out, _ = nn.utils.rnn.pad_packed_sequence(ref_out, batch_first=True, total_length=6)
    out, h = ours(x, lengths)
    torch.testing.assert_close(out, ref_out, **TIGHT)
    torch.testing.assert_close(h, ref_h, **TIGHT)


def test_gru_encoder_pools_the_last_real_token_and_ignores_padding():
    mmbook.set_seed(0)
    enc = GRUEncoder(30, 8, 6, num_layers=2).double()
    ids = torch.randint(1, 30, (2, 5))
    short = enc(ids[:, :3], torch.ones(2, 3, dtype=torch.long))
    padded_ids = torch.cat([ids[:, :3], torch.zeros(2, 4, dtype=torch.long)], dim=1)
    padded = enc(padded_ids, torch.tensor([[1, 1, 1, 0, 0, 0, 0]] * 2))
    assert isinstance(padded, EncoderOutput) and padded.last_hidden_state.shape == (2, 7, 6)
    torch.testing.assert_close(padded.pooler_output, short.pooler_output, **TIGHT)
    torch.testing.assert_close(short.pooler_output, short.last_hidden_state[:, -1], **TIGHT)


def test_gru_bad_input():
    with pytest.raises(ValueError, match="hidden_size must be a positive int"):
        GRUCell(3, 0)
    cell = GRUCell(3, 4)
    with pytest.raises(ValueError, match=r"x must have shape \(batch, 3\)"):
        cell(torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"h must have shape \(2, 4\)"):
        cell(torch.randn(2, 3), torch.randn(2, 5))
    gru = GRU(3, 4)
    with pytest.raises(ValueError, match=r"lengths must lie in \[1, 5\]"):
        gru(torch.randn(2, 5, 3), torch.tensor([5, 0]))
    with pytest.raises(ValueError, match=r"h0 must have shape \(1, 2, 4\)"):
        gru(torch.randn(2, 5, 3), h0=torch.randn(2, 4))
    with pytest.raises(TypeError, match="module must be nn.GRU"):
        gru.load_from_torch(nn.LSTM(3, 4))
    with pytest.raises(ValueError, match="sizes differ"):
        gru.load_from_torch(nn.GRU(3, 4, bidirectional=True))
    enc = GRUEncoder(10, 4, 4)
    with pytest.raises(ValueError, match="pad on the right"):
        enc(torch.ones(1, 4, dtype=torch.long), torch.tensor([[0, 1, 1, 1]]))
    with pytest.raises(TypeError, match="input_ids must be an integer"):
        enc(torch.ones(1, 4))
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, 10\)"):
        enc(torch.full((1, 4), 10))


# ----------------------------------------------------------------------------- Transformer


def test_encoder_layer_matches_torch():
    mmbook.set_seed(0)
    ref = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, activation="gelu", layer_norm_eps=1e-12,
                                     batch_first=True, dtype=torch.float64).eval()
    ours = EncoderLayer(16, 4, 32, dropout=0.0, attention_dropout=0.0).double().load_from_torch(ref).eval()
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    real = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    with torch.no_grad():
        torch.testing.assert_close(ours(x, real[:, None, :])[real], ref(x, src_key_padding_mask=~real)[real], **TIGHT)
        torch.testing.assert_close(ours(x), ref(x), **TIGHT)


def test_encoder_layer_bad_input():
    layer = EncoderLayer(16, 4, 32)
    with pytest.raises(ValueError, match="norm_first=False"):
        layer.load_from_torch(nn.TransformerEncoderLayer(16, 4, 32, activation="gelu", norm_first=True))
    with pytest.raises(ValueError, match="activation='gelu'"):
        layer.load_from_torch(nn.TransformerEncoderLayer(16, 4, 32))  # relu
    with pytest.raises(TypeError, match="nn.TransformerEncoderLayer"):
        layer.load_from_torch(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="d_ff must be a positive int"):
        EncoderLayer(16, 4, 0)


# ------------------------------------------------------------------------------------ BERT


def test_bert_matches_transformers_bert_model():
    mmbook.set_seed(0)
    hf = transformers.BertModel(_hf_config()).double().eval()
    ours = load_hf_bert_weights(BertEncoder(BertConfig.from_hf(hf.config)), hf).double().eval()
    ids, mask, types = _batch()
    with torch.no_grad():
        out = ours(ids, mask, types)
        ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=types)
    torch.testing.assert_close(out.last_hidden_state, ref.last_hidden_state, **TIGHT)
    torch.testing.assert_close(out.pooler_output, ref.pooler_output, **TIGHT)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in hf.parameters())


def test_bert_mlm_matches_transformers_and_fast_loss():
    mmbook.set_seed(0)
    hf = transformers.BertForMaskedLM(_hf_config()).double().eval()
    ours = load_hf_bert_weights(BertForMaskedLM(BertConfig.from_hf(hf.config)), hf).double().eval()
    ids, mask, types = _batch()
    with torch.no_grad():
        logits = ours(ids, mask, types)
        torch.testing.assert_close(logits, hf(input_ids=ids, attention_mask=mask, token_type_ids=types).logits,
                                   **TIGHT)
        _, labels = mask_tokens(ids, mask_token_id=4, vocab_size=40, special_token_ids=range(5),
                                mlm_probability=0.5, generator=torch.Generator().manual_seed(0))
        full = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        torch.testing.assert_close(ours.mlm_loss(ids, labels, mask, types), full, **TIGHT)


def test_export_is_the_inverse_of_load_and_fills_a_classifier():
    """Our MLM model's encoder copied into transformers' BertForSequenceClassification gives the same hidden states
    (float64, 1e-12); the classification head is left at its initialisation; a round trip restores every weight."""
    mmbook.set_seed(0)
    ours = BertForMaskedLM(BertConfig.from_hf(_hf_config())).double().eval()
    hf = transformers.BertForSequenceClassification(_hf_config(num_labels=3)).double().eval()
    head = hf.classifier.weight.clone()
    assert export_hf_bert_weights(ours, hf) is hf
    ids, mask, types = _batch()
    with torch.no_grad():
        mine = ours.bert(ids, mask, types)
        theirs = hf.bert(input_ids=ids, attention_mask=mask, token_type_ids=types)
    torch.testing.assert_close(theirs.last_hidden_state, mine.last_hidden_state, **TIGHT)
    torch.testing.assert_close(theirs.pooler_output, mine.pooler_output, **TIGHT)
    assert torch.equal(hf.classifier.weight, head)
    fresh = load_hf_bert_weights(BertForMaskedLM(BertConfig.from_hf(_hf_config())).double(), hf)
    enc_a, enc_b = ours.bert.state_dict(), fresh.bert.state_dict()
    assert all(torch.equal(enc_a[k], enc_b[k]) for k in enc_a)
    with pytest.raises(ValueError, match="export_hf_bert_weights: 3 layers here"):
        export_hf_bert_weights(BertEncoder(BertConfig.from_hf(_hf_config(num_hidden_layers=3))), hf)
    with pytest.raises(TypeError, match="export_hf_bert_weights: hf_model must be a transformers BERT"):
        export_hf_bert_weights(ours, nn.Linear(2, 2))


def test_bert_init_is_bert_like_and_classifier_runs():
    mmbook.set_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=16)
    enc = BertEncoder(config)
    w = enc.layers[0].linear1.weight
    assert abs(w.std().item() - 0.02) < 0.003 and enc.layers[0].linear1.bias.abs().max() == 0
    assert enc.embeddings.word_embeddings.weight[0].abs().max() == 0  # padding row
    model = SequenceClassifier(enc, 32, 3)
    ids, mask, types = _batch()
    assert model(ids, mask, types).shape == (3, 3)
    assert SequenceClassifier(GRUEncoder(40, 8, 8), 8, 3)(ids, mask).shape == (3, 3)


def test_bert_bad_input():
    with pytest.raises(ValueError, match="must be divisible by num_attention_heads"):
        BertConfig(hidden_size=30, num_attention_heads=4)
    with pytest.raises(ValueError, match="hidden_dropout_prob must be in"):
        BertConfig(hidden_dropout_prob=1.5)
    with pytest.raises(ValueError, match="hidden_act='gelu'"):
        BertConfig.from_hf(_hf_config(hidden_act="relu"))
    with pytest.raises(TypeError, match="need a transformers BertConfig"):
        BertConfig.from_hf(transformers.GPT2Config())
    with pytest.raises(TypeError, match="config must be mmbook.encoders.BertConfig"):
        BertEncoder(_hf_config())
    enc = BertEncoder(BertConfig.from_hf(_hf_config()))
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, 40\)"):
        enc(torch.full((1, 3), 40))
    with pytest.raises(ValueError, match=r"token_type_ids must lie in \[0, 2\)"):
        enc(torch.ones(1, 3, dtype=torch.long), token_type_ids=torch.full((1, 3), 2))
    with pytest.raises(ValueError, match="exceeds max_position_embeddings"):
        enc(torch.ones(1, 30, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask must have the shape of input_ids"):
        enc(torch.ones(2, 3, dtype=torch.long), torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="attention_mask must hold 0/1"):
        enc(torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3))
    with pytest.raises(ValueError, match="3 layers here, 2 in the transformers model"):
        load_hf_bert_weights(BertEncoder(BertConfig.from_hf(_hf_config(num_hidden_layers=3))),
                             transformers.BertModel(_hf_config()))
    with pytest.raises(ValueError, match="has shape"):
        load_hf_bert_weights(BertEncoder(BertConfig.from_hf(_hf_config(vocab_size=41))),
                             transformers.BertModel(_hf_config()))
    with pytest.raises(TypeError, match="hf_model must be a transformers BERT"):
        load_hf_bert_weights(enc, nn.Linear(2, 2))
    with pytest.raises(TypeError, match="ours must be a BertEncoder"):
        load_hf_bert_weights(nn.Linear(2, 2), transformers.BertModel(_hf_config()))
    mlm = BertForMaskedLM(BertConfig.from_hf(_hf_config()))
    with pytest.raises(ValueError, match="no position is selected"):
        mlm.mlm_loss(torch.ones(1, 3, dtype=torch.long), torch.full((1, 3), -100))
    with pytest.raises(TypeError, match="encoder must be an nn.Module"):
        SequenceClassifier("bert", 8, 2)


# ------------------------------------------------------------------------- MLM and pooling


def test_mask_tokens_statistics_and_specials():
    ids = torch.randint(5, 100, (200, 100))
    ids[:, 0], ids[:, -1], ids[:50, 80:-1] = 2, 3, 0  # [CLS], [SEP], padding
    corrupted, labels = mask_tokens(ids, mask_token_id=4, vocab_size=100, special_token_ids=[0, 1, 2, 3],
                                    generator=torch.Generator().manual_seed(0))
    special = ids < 5
    selected = labels != -100
    assert not selected[special].any() and torch.equal(corrupted[special], ids[special])
    assert torch.equal(labels[selected], ids[selected])
    n = int((~special).sum())
    rate = selected.sum().item() / n
    assert abs(rate - 0.15) < 5 * (0.15 * 0.85 / n) ** 0.5
    masked = (corrupted[selected] == 4).float().mean().item()
    swapped = ((corrupted != ids) & (corrupted != 4))[selected].float().mean().item()
    m = int(selected.sum())
    assert abs(masked - 0.8) < 5 * (0.16 / m) ** 0.5 and abs(swapped - 0.1 * (1 - 1 / 95)) < 5 * (0.09 / m) ** 0.5
    assert corrupted.max() < 100 and not torch.isin(corrupted[selected & (corrupted != 4)], torch.arange(5)).any()
    again = mask_tokens(ids, mask_token_id=4, vocab_size=100, special_token_ids=[0, 1, 2, 3],
                        generator=torch.Generator().manual_seed(0))
    assert torch.equal(again[0], corrupted) and torch.equal(again[1], labels)


def test_mask_tokens_bad_input():
    ids = torch.randint(5, 10, (2, 3))
    with pytest.raises(ValueError, match="mlm_probability must be in"):
        mask_tokens(ids, mask_token_id=4, vocab_size=10, mlm_probability=1.5)
    with pytest.raises(ValueError, match=r"mask_token_id must be in \[0, 10\)"):
        mask_tokens(ids, mask_token_id=10, vocab_size=10)
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, vocab_size=8\)"):
        mask_tokens(ids, mask_token_id=4, vocab_size=8)
    with pytest.raises(TypeError, match="input_ids must be an integer"):
        mask_tokens(ids.float(), mask_token_id=4, vocab_size=10)


def test_mean_pool_matches_a_loop():
    h = torch.randn(2, 4, 3, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    expected = torch.stack([h[0, :2].mean(0), h[1].mean(0)])
    torch.testing.assert_close(mean_pool(h, mask), expected, **TIGHT)
    with pytest.raises(ValueError, match=r"attention_mask must have shape \(2, 4\)"):
        mean_pool(h, mask[:, :3])
    with pytest.raises(ValueError, match=r"last_hidden_state must have shape \(batch, seq, hidden\)"):
        mean_pool(h[0], mask)


def test_sentence_embeddings_restore_order_and_normalise():
    from mmbook.textdata import pruned_wordpiece_tokenizer

    texts = ["a much longer sentence about strings and numbers", "short one", "a middle sized sentence"]
    tok = pruned_wordpiece_tokenizer(texts)
    mmbook.set_seed(0)
    enc = BertEncoder(BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=32, max_position_embeddings=32)).eval()
    vectors = sentence_embeddings(enc, tok, texts, batch_size=2)
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = F.normalize(mean_pool(enc(**batch).last_hidden_state, batch["attention_mask"]), dim=-1)
    # float32: different padding per batch changes only the summation order
    torch.testing.assert_close(vectors, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="texts must be a non-empty sequence"):
        sentence_embeddings(enc, tok, "one string")
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        sentence_embeddings(enc, tok, texts, batch_size=0)


def test_config_roundtrip():
    hf = _hf_config()
    config = BertConfig.from_hf(hf)
    assert dataclasses.asdict(config)["vocab_size"] == 40 and config.layer_norm_eps == hf.layer_norm_eps
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.hidden_size = 8


def test_bad_input_never_wraps_and_is_named_by_the_callee():
    ids = torch.tensor([[5, 6, 7], [8, 9, 5]])
    with pytest.raises(ValueError, match=r"mask_tokens: special_token_ids\[i\] must be in \[0, 10\), got -1"):
        mask_tokens(ids, mask_token_id=3, vocab_size=10, special_token_ids=[-1])  # would protect id 9
    with pytest.raises(TypeError, match="mask_tokens: mask_token_id must be an int, got float"):
        mask_tokens(ids, mask_token_id=3.0, vocab_size=10)
    with pytest.raises(TypeError, match="mask_tokens: generator must be a torch.Generator or None, got int"):
        mask_tokens(ids, mask_token_id=3, vocab_size=10, generator=0)
    with pytest.raises(ValueError, match="mask_tokens: special_token_ids and mask_token_id cover the whole"):
        mask_tokens(torch.tensor([[0, 1]]), mask_token_id=2, vocab_size=3, special_token_ids=[0, 1])
    with pytest.raises(ValueError, match=r"GRUEncoder: padding_idx must be in \[0, 10\), got -1"):
        GRUEncoder(10, 4, 4, padding_idx=-1)  # nn.Embedding would read -1 as row 9
    with pytest.raises(ValueError, match=r"GRUEncoder: dropout must be in \[0, 1\), got nan"):
        GRUEncoder(10, 4, 4, dropout=float("nan"))
    with pytest.raises(ValueError, match="GRUEncoder: attention_mask must hold 0/1"):
        GRUEncoder(10, 4, 4)(ids, torch.full((2, 3), 2))
    with pytest.raises(TypeError, match="GRUCell: x has dtype torch.float64"):
        GRUCell(3, 4)(torch.zeros(2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="GRU: lengths must be an integer tensor"):
        GRU(3, 4)(torch.zeros(2, 5, 3), torch.tensor([True, True]))
    with pytest.raises(ValueError, match="GRU: x must hold at least one time step"):
        GRU(3, 4)(torch.zeros(2, 0, 3))
    layer = EncoderLayer(8, 2, 16)
    with pytest.raises(ValueError, match=r"EncoderLayer: x must have shape \(batch, seq, 8\), got \(2, 5, 6\)"):
        layer(torch.zeros(2, 5, 6))  # not MultiHeadAttention's "query"
    with pytest.raises(TypeError, match="EncoderLayer: x has dtype torch.float64"):
        layer(torch.zeros(2, 5, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="EncoderLayer: layer_norm_eps must be a positive number, got nan"):
        EncoderLayer(8, 2, 16, layer_norm_eps=float("nan"))
    config = BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=16, max_position_embeddings=16)
    with pytest.raises(ValueError, match="BertConfig: initializer_range must be a number >= 0"):
        BertConfig(initializer_range=-1.0)
    with pytest.raises(TypeError, match="BertConfig: hidden_dropout_prob must be a number, got str"):
        BertConfig(hidden_dropout_prob="0.1")
    bert = BertForMaskedLM(config)
    with pytest.raises(ValueError, match=r"mlm_loss: labels must lie in \[0, 20\) \(or -100\)"):
        bert.mlm_loss(ids, torch.full((2, 3), 20))  # not cross_entropy's "Target 20 is out of bounds"
    with pytest.raises(ValueError, match=r"BertEmbeddings: input_ids must lie in \[0, 20\)"):
        bert.bert.embeddings(torch.full((2, 3), 20))
    with pytest.raises(TypeError, match="BertEmbeddings: token_type_ids must be an integer tensor"):
        bert.bert.embeddings(ids, torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"BertEncoder: input_ids must have shape \(batch, seq\) with seq >= 1"):
        bert.bert(torch.zeros(2, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="mean_pool: attention_mask must hold 0/1"):
        mean_pool(torch.randn(2, 3, 8), -torch.ones(2, 3))
    with pytest.raises(ValueError, match="SequenceClassifier: the encoder must return an EncoderOutput"):
        SequenceClassifier(bert.bert, 6, 2)(ids)  # not "mat1 and mat2 shapes cannot be multiplied"
    with pytest.raises(TypeError, match="sentence_embeddings: normalize must be True or False"):
        sentence_embeddings(bert.bert, lambda texts, **kw: None, ["a"], normalize="no")
