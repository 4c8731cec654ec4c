"""Tests of mmbook.contrastive against independent references (transformers' CLIPModel, explicit loops)."""

import math

import pytest
import torch
from torch import nn

from mmbook.contrastive import (
    BagOfWordsEncoder,
    DualEncoder,
    TransformerTextEncoder,
    clip_logits,
    clip_loss,
    decay_groups,
    distinct_group_batches,
    encode,
    prompt_ensemble,
    recall_at_k,
    siglip_loss,
    train_dual_encoder,
    zero_shot_classify,
)
from mmbook.data import WordVocab, converse_caption, swap_attributes, swap_relation

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: tiny models run fastest on one thread


def _loop_loss(image, text, scale, negatives=None):
    """The symmetric InfoNCE loss with Python loops (float64 via math)."""
    def unit(rows):
        return [[x / math.sqrt(sum(y * y for y in r)) for x in r] for r in rows]

    u, v = unit(image.tolist()), unit(text.tolist())
    extra = unit(negatives.tolist()) if negatives is not None else []
    n = len(u)
    cols = v + extra
    logit = [[scale * sum(a * b for a, b in zip(u[i], c, strict=True)) for c in cols] for i in range(n)]
    i2t = sum(-logit[i][i] + math.log(sum(math.exp(x) for x in logit[i])) for i in range(n)) / n
    t2i = sum(-logit[j][j] + math.log(sum(math.exp(logit[k][j]) for k in range(n))) for j in range(n)) / n
    return 0.5 * (i2t + t2i)


# ----------------------------------------------------------------------------- the loss
def test_clip_loss_matches_transformers_clip_model():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        text_config={"vocab_size": 30, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 10},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "image_size": 16, "patch_size": 8},
        projection_dim=8,
    )
    model = transformers.CLIPModel(config).double().eval()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(20.0))  # not the default, so a mix-up of log and scale would show
        out = model(input_ids=torch.randint(3, 30, (4, 6)), pixel_values=torch.rand(4, 3, 16, 16,
                                                                                     dtype=torch.float64),
                    return_loss=True)
    torch.testing.assert_close(out.image_embeds.norm(dim=-1), torch.ones(4, dtype=torch.float64))
    ours = clip_loss(out.image_embeds, out.text_embeds, model.logit_scale.exp())
    torch.testing.assert_close(ours, out.loss, rtol=1e-12, atol=1e-12)  # float64, rounding order only
    torch.testing.assert_close(clip_logits(out.image_embeds, out.text_embeds, model.logit_scale.exp()),
                               out.logits_per_image, rtol=1e-12, atol=1e-12)


def test_clip_loss_matches_loop_and_hard_negatives():
    torch.manual_seed(1)
    image, text, negatives = (torch.randn(5, 4, dtype=torch.float64) for _ in range(3))
    assert clip_loss(image, text, 7.0).item() == pytest.approx(_loop_loss(image, text, 7.0), rel=1e-12)
    assert clip_loss(image, text, 7.0, hard_negatives=negatives[:3]).item() == pytest.approx(
        _loop_loss(image, text, 7.0, negatives[:3]), rel=1e-12)


def test_clip_loss_symmetry_scale_invariance_and_chance_value():
    torch.manual_seed(2)
    image, text = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    loss = clip_loss(image, text, 10.0)
    torch.testing.assert_close(clip_loss(text, image, 10.0), loss, rtol=1e-14, atol=1e-14)
    scales = torch.rand(6, 1, dtype=torch.float64) + 0.1
    torch.testing.assert_close(clip_loss(image * scales, text, 10.0), loss, rtol=1e-12, atol=1e-12)
    ones = torch.ones(6, 3, dtype=torch.float64)
    assert clip_loss(ones, ones, 3.0).item() == pytest.approx(math.log(6), rel=1e-12)


def test_clip_loss_gradient_flows_into_logit_scale():
    torch.manual_seed(3)
    t = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    image, text = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    clip_loss(image, text, t.exp()).backward()
    eps = 1e-6
    numeric = (clip_loss(image, text, math.exp(2 + eps)) - clip_loss(image, text, math.exp(2 - eps))) / (2 * eps)
    assert t.grad.item() == pytest.approx(numeric.item(), rel=1e-6)


@pytest.mark.parametrize(
    ("image", "text", "scale", "error", "match"),
    [
        (torch.randn(4, 3), torch.randn(5, 3), 1.0, ValueError, "same shape"),
        (torch.randn(4, 3), torch.randn(4, 2), 1.0, ValueError, "same shape"),
        (torch.randn(4), torch.randn(4), 1.0, ValueError, r"clip_loss: image_embeds must have shape \(batch, embed"),
        (torch.randn(2, 4, 3), torch.randn(2, 4, 3), 1.0, ValueError, "image_embeds must have shape"),
        (torch.randn(4, 3), torch.randn(4, 3), 0.0, ValueError, "positive"),
        (torch.randn(4, 3), torch.randn(4, 3), -2.0, ValueError, "positive"),
        (torch.randn(4, 3), torch.randn(4, 3), float("inf"), ValueError, "positive"),
        (torch.randn(4, 3), torch.randn(4, 3), torch.tensor([1.0, 2.0]), ValueError, "scalar"),
        (torch.randn(4, 3), torch.randn(4, 3), "1", TypeError, "logit_scale"),
        (torch.randint(0, 3, (4, 3)), torch.randn(4, 3), 1.0, TypeError, "floating"),
        ([[1.0]], torch.randn(1, 1), 1.0, TypeError, "image_embeds"),
        (torch.randn(0, 3), torch.randn(0, 3), 1.0, ValueError, "empty"),
    ],
)
def test_clip_loss_rejects_bad_input(image, text, scale, error, match):
    with pytest.raises(error, match=match):
        clip_loss(image, text, scale)


def test_clip_loss_rejects_bad_hard_negatives_and_logits_dims():
    with pytest.raises(ValueError, match="hard_negatives"):
        clip_loss(torch.randn(3, 4), torch.randn(3, 4), 1.0, hard_negatives=torch.randn(2, 5))
    with pytest.raises(ValueError, match="embed_dim"):
        clip_logits(torch.randn(3, 4), torch.randn(5, 3), 1.0)
    assert clip_logits(torch.randn(3, 4), torch.randn(5, 4), 2.0).shape == (3, 5)


# ----------------------------------------------------------------------------- retrieval and zero-shot
def _brute_force_recall(sim, k, pos):
    hits = 0
    for q in range(sim.shape[0]):
        best = max(sim[q, c].item() for c in range(sim.shape[1]) if pos[q, c])
        rank = sum(1 for c in range(sim.shape[1]) if not pos[q, c] and sim[q, c].item() >= best)
        hits += rank < k
    return hits / sim.shape[0]


@pytest.mark.parametrize("k", [1, 2, 5])
def test_recall_at_k_matches_brute_force(k):
    torch.manual_seed(4)
    sim = torch.randint(0, 4, (12, 9)).float()  # many ties on purpose
    pos = torch.zeros(12, 9, dtype=torch.bool)
    pos[torch.arange(12), torch.randint(0, 9, (12,))] = True
    pos[torch.arange(0, 12, 3), torch.randint(0, 9, (4,))] = True  # some queries with two positives
    assert recall_at_k(sim, k, pos) == pytest.approx(_brute_force_recall(sim, k, pos))
    square = torch.randn(7, 7)
    assert recall_at_k(square, k) == pytest.approx(_brute_force_recall(square, k, torch.eye(7, dtype=torch.bool)))


def test_recall_at_k_counts_ties_against_the_model():
    sim = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    assert recall_at_k(sim, 1) == 0.5 and recall_at_k(sim, 2) == 1.0


def test_recall_at_k_rejects_bad_input():
    with pytest.raises(ValueError, match="square"):
        recall_at_k(torch.randn(3, 4), 1)
    with pytest.raises(ValueError, match="positives"):
        recall_at_k(torch.randn(3, 3), 1, torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="at least one positive"):
        recall_at_k(torch.randn(2, 2), 1, torch.tensor([[True, False], [False, False]]))
    with pytest.raises(ValueError, match="positive"):
        recall_at_k(torch.randn(3, 3), 0)
    with pytest.raises(TypeError, match="similarity"):
        recall_at_k(torch.ones(3, 3, dtype=torch.int64), 1)


def test_prompt_ensemble_and_zero_shot_classify():
    torch.manual_seed(5)
    prompts = torch.randn(4, 3, 6, dtype=torch.float64)
    classes = prompt_ensemble(prompts)
    units = prompts / prompts.norm(dim=-1, keepdim=True)
    expected = units.mean(1) / units.mean(1).norm(dim=-1, keepdim=True)
    torch.testing.assert_close(classes, expected, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(prompt_ensemble(prompts[:, :1]), units[:, 0], rtol=1e-14, atol=1e-14)
    media = classes[[2, 0, 3]] * 5 + 0.01 * torch.randn(3, 6, dtype=torch.float64)
    assert zero_shot_classify(media, classes).tolist() == [2, 0, 3]
    with pytest.raises(ValueError, match="num_templates"):
        prompt_ensemble(torch.randn(4, 6))
    with pytest.raises(ValueError, match="embed_dim"):
        zero_shot_classify(torch.randn(3, 5), torch.randn(4, 6))


# ----------------------------------------------------------------------------- twins
def test_swaps():
    caption = "a red circle left of a blue square"
    assert swap_relation(caption) == "a blue square left of a red circle"
    assert swap_attributes(caption) == "a blue circle left of a red square"
    assert swap_relation("a green triangle above a red circle and a blue square") == \
        "a red circle above a green triangle and a blue square"
    assert swap_attributes("a red circle below a red square") == "a red circle below a red square"
    assert sorted(swap_relation(caption).split()) == sorted(caption.split())
    with pytest.raises(ValueError, match="swap_relation: caption must look like"):
        swap_relation("a red circle")
    with pytest.raises(ValueError, match="swap_relation: caption must look like"):  # the data's grammar, no other
        swap_relation("a big dog above a small cat")
    with pytest.raises(TypeError, match="swap_attributes: caption must be a str"):
        swap_attributes(3)


# ----------------------------------------------------------------------------- towers
CAPTIONS = ["a red circle left of a blue square", "a blue square above a green triangle",
            "a green circle right of a red triangle"]


def test_bag_of_words_is_order_blind_exactly_and_matches_mean_embedding():
    vocab = WordVocab(CAPTIONS)
    torch.manual_seed(6)
    tower = BagOfWordsEncoder(len(vocab), embed_dim=8, d_model=16)
    ids, lengths = vocab.encode_batch(CAPTIONS + [swap_relation(c) for c in CAPTIONS])
    out = tower(ids, lengths)
    assert out.shape == (6, 8) and torch.equal(out[:3], out[3:])
    padded = torch.cat([ids, torch.zeros(6, 3, dtype=torch.int64)], dim=1)  # extra padding changes nothing
    torch.testing.assert_close(tower(padded, lengths), out, rtol=0, atol=1e-6)
    mean = torch.stack([tower.embed[ids[i, : lengths[i]]].mean(0) for i in range(6)])
    torch.testing.assert_close(tower.head(mean), out, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="ids must lie"):
        tower(torch.full((1, 3), len(vocab)), None)
    with pytest.raises(ValueError, match="lengths"):
        tower(ids, lengths[:2])
    with pytest.raises(ValueError, match="ids must be an integer"):
        tower(ids.float(), lengths)


def test_transformer_text_encoder_sees_order_and_ignores_padding():
    vocab = WordVocab(CAPTIONS)
    torch.manual_seed(7)
    for pooling in ("concat", "mean"):
        tower = TransformerTextEncoder(len(vocab), embed_dim=8, d_model=16, num_heads=2, max_len=12,
                                       pooling=pooling).eval()
        ids, lengths = vocab.encode_batch(CAPTIONS + [swap_relation(c) for c in CAPTIONS])
        out = tower(ids, lengths)
        assert out.shape == (6, 8) and not torch.allclose(out[:3], out[3:], atol=1e-6)
        padded = torch.cat([ids, torch.full((6, 2), 5)], dim=1)  # junk after the lengths is masked
        torch.testing.assert_close(tower(padded, lengths), out, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="pooling"):
        TransformerTextEncoder(len(vocab), pooling="max")
    with pytest.raises(ValueError, match="lengths must lie"):
        tower(ids, torch.zeros(6, dtype=torch.int64))
    with pytest.raises(ValueError, match="TransformerTextEncoder: ids must have at most max_len=12"):
        tower(torch.zeros(2, 13, dtype=torch.int64), None)
    with pytest.raises(ValueError, match="TransformerTextEncoder: max_len must be a positive int"):
        TransformerTextEncoder(len(vocab), max_len=0)


def test_transformer_text_encoder_last_token_readout_is_causal():
    """pooling="last": a causal Transformer read at the last real token, checked against running each caption
    alone, cut to its length (an independent path: no padding, no gather)."""
    vocab = WordVocab(CAPTIONS)
    torch.manual_seed(17)
    tower = TransformerTextEncoder(len(vocab), embed_dim=8, d_model=16, num_heads=2, max_len=12,
                                   pooling="last").eval()
    assert tower.transformer.causal
    ids, lengths = vocab.encode_batch(CAPTIONS + [swap_relation(c) for c in CAPTIONS] + ["a red circle"])
    out = tower(ids, lengths)
    alone = torch.cat([tower(ids[i: i + 1, : lengths[i]], None) for i in range(len(ids))])
    torch.testing.assert_close(out, alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out[:3], out[3:6], atol=1e-6)  # the last word attends over every position
    # causal: the output at a position does not depend on later words
    changed = ids.clone()
    changed[0, lengths[0] - 1] = 5
    prefix = tower.transformer(ids[:1], lengths[:1])[:, : lengths[0] - 1]
    torch.testing.assert_close(tower.transformer(changed[:1], lengths[:1])[:, : lengths[0] - 1], prefix)


def test_dual_encoder_normalises_and_clips_scale():
    torch.manual_seed(8)
    model = DualEncoder(nn.Linear(5, 4), BagOfWordsEncoder(10, embed_dim=4), init_temperature=0.07,
                        max_logit_scale=100.0)
    assert model.logit_scale.item() == pytest.approx(1 / 0.07, rel=1e-6)
    media, text, scale = model(torch.randn(3, 5), torch.randint(0, 10, (3, 4)), torch.tensor([4, 2, 1]))
    torch.testing.assert_close(media.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(3))
    with torch.no_grad():
        model.log_logit_scale.fill_(10.0)
    assert model.logit_scale.item() == pytest.approx(100.0, rel=1e-6)
    with pytest.raises(TypeError, match="media_encoder"):
        DualEncoder(lambda x: x, BagOfWordsEncoder(10))
    with pytest.raises(ValueError, match="init_temperature"):
        DualEncoder(nn.Linear(5, 4), BagOfWordsEncoder(10, embed_dim=4), init_temperature=0.0)
    with pytest.raises(ValueError, match="max_logit_scale"):
        DualEncoder(nn.Linear(5, 4), BagOfWordsEncoder(10, embed_dim=4), max_logit_scale=5.0)
    with pytest.raises(ValueError, match="same"):
        DualEncoder(nn.Linear(5, 3), BagOfWordsEncoder(10, embed_dim=4))(torch.randn(2, 5),
                                                                           torch.randint(0, 10, (2, 3)))


def _toy_pairs(n=60):
    """Pairs whose 'media' is a noisy one-hot of the caption's word: learnable in a few steps."""
    labels = torch.arange(n) % 6
    media = nn.functional.one_hot(labels, 6).float() + 0.1 * torch.randn(n, 6)
    ids = (labels + 4)[:, None]  # one word per caption
    return media, ids, torch.ones(n, dtype=torch.int64), labels


def test_train_dual_encoder_learns_and_groups_avoid_duplicates():
    torch.manual_seed(9)
    media, ids, lengths, labels = _toy_pairs()
    model = DualEncoder(nn.Linear(6, 8), BagOfWordsEncoder(10, embed_dim=8, d_model=8))
    history = train_dual_encoder(model, media, ids, lengths, epochs=15, batch_size=6, lr=3e-2, seed=0,
                                 groups=labels)
    assert len(history) == 15 and history[-1] < history[0]
    model.eval()
    sim = encode(model.encode_media, media) @ encode(model.encode_text, ids, lengths, batch_size=7).T
    assert recall_at_k(sim, 1, labels[:, None] == labels[None, :]) >= 0.9

    from mmbook.contrastive import _distinct_group_batches
    batches = _distinct_group_batches(labels, 4, torch.Generator().manual_seed(0))
    assert sorted(torch.cat(batches).tolist()) == list(range(60))
    assert all(len(set(labels[b].tolist())) == len(b) for b in batches)


def test_train_dual_encoder_with_hard_negatives_is_deterministic():
    media, ids, lengths, _ = _toy_pairs(24)
    runs = []
    for _ in range(2):
        torch.manual_seed(10)
        model = DualEncoder(nn.Linear(6, 8), BagOfWordsEncoder(10, embed_dim=8, d_model=8))
        runs.append(train_dual_encoder(model, media, ids, lengths, epochs=2, batch_size=8, seed=3,
                                       hard_negatives=lambda rows: (torch.full((rows.numel(), 1), 4),
                                                                    torch.ones(rows.numel(), dtype=torch.int64))))
    assert runs[0] == runs[1]


def test_train_dual_encoder_and_encode_reject_bad_input():
    media, ids, lengths, labels = _toy_pairs(12)
    model = DualEncoder(nn.Linear(6, 8), BagOfWordsEncoder(10, embed_dim=8))
    with pytest.raises(TypeError, match="DualEncoder"):
        train_dual_encoder(nn.Linear(2, 2), media, ids, lengths)
    with pytest.raises(ValueError, match="same number of pairs"):
        train_dual_encoder(model, media[:5], ids, lengths)
    with pytest.raises(ValueError, match="groups"):
        train_dual_encoder(model, media, ids, lengths, groups=labels[:3])
    with pytest.raises(ValueError, match="epochs"):
        train_dual_encoder(model, media, ids, lengths, epochs=0)
    with pytest.raises(TypeError, match="media"):
        train_dual_encoder(model, ids, ids, lengths)
    with pytest.raises(ValueError, match="first dimension"):
        encode(model.encode_text, ids, lengths[:3])
    with pytest.raises(TypeError, match="tensors"):
        encode(model.encode_media)


def test_nan_never_becomes_a_hit_or_a_class_and_dtype_mixes_are_named():
    sim = torch.randn(4, 4)
    for bad in (torch.full((4, 4), math.nan), sim.masked_fill(torch.eye(4, dtype=torch.bool), math.nan)):
        with pytest.raises(ValueError, match="recall_at_k: similarity contains NaN"):
            recall_at_k(bad, 1)  # was 1.0: NaN compares False, so no wrong candidate ranked above
    media, classes = torch.randn(4, 8), torch.randn(3, 8)
    with pytest.raises(ValueError, match="zero_shot_classify: media_embeds contains NaN"):
        zero_shot_classify(media * math.nan, classes)  # was class 0 for every example
    with pytest.raises(ValueError, match="zero_shot_classify: class_embeds contains NaN"):
        zero_shot_classify(media, classes * math.nan)
    with pytest.raises(TypeError, match="clip_logits: text_embeds and image_embeds must have the same dtype"):
        clip_logits(media, media.double(), 10.0)
    bow = BagOfWordsEncoder(10, 8, 16)
    ids = torch.randint(0, 10, (2, 5))
    with pytest.raises(TypeError, match="BagOfWordsEncoder: lengths must be an integer tensor"):
        bow(ids, torch.tensor([2.5, 3.0]))  # a fractional length made a plausible embedding
    model = DualEncoder(nn.Linear(4, 8), bow)
    pairs = torch.randn(2, 4)
    with pytest.raises(ValueError, match="train_dual_encoder: lr must be a positive number, got inf"):
        train_dual_encoder(model, pairs, ids, torch.tensor([5, 3]), epochs=1, lr=math.inf)
    with pytest.raises(ValueError, match="train_dual_encoder: weight_decay must be a number >= 0, got nan"):
        train_dual_encoder(model, pairs, ids, torch.tensor([5, 3]), epochs=1, weight_decay=math.nan)
    with pytest.raises(ValueError, match="train_dual_encoder: lengths is required"):
        train_dual_encoder(model, pairs, ids, None, epochs=1)
    with pytest.raises(ValueError, match="train_dual_encoder: media contains NaN"):
        train_dual_encoder(model, pairs * math.nan, ids, torch.tensor([5, 3]), epochs=1)
    with pytest.raises(TypeError, match="train_dual_encoder: hard_negatives must be a callable"):
        train_dual_encoder(model, pairs, ids, torch.tensor([5, 3]), epochs=1, hard_negatives=3)
    with pytest.raises(TypeError, match="encode: encoder must be a callable"):
        encode(3, pairs)
    with pytest.raises(ValueError, match="encode: device must name a torch device"):
        encode(model.encode_media, pairs, device="tpu")


# ----------------------------------------------------------------------------- SigLIP, chunks, groups, converse
def _loop_siglip(image, text, scale, bias):
    """SigLIP's sigmoid loss with Python loops (float64 via math): -(1/N) sum_ij log sigmoid(z_ij * logit_ij)."""
    def unit(rows):
        return [[x / math.sqrt(sum(y * y for y in r)) for x in r] for r in rows]

    u, v = unit(image.tolist()), unit(text.tolist())
    n = len(u)
    total = 0.0
    for i in range(n):
        for j in range(n):
            logit = scale * sum(a * b for a, b in zip(u[i], v[j], strict=True)) + bias
            z = 1.0 if i == j else -1.0
            total += math.log1p(math.exp(-z * logit))  # -log sigmoid(z * logit)
    return total / n


def test_siglip_loss_matches_loop_and_transformers_siglip_model():
    torch.manual_seed(11)
    image, text = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    assert siglip_loss(image, text, 10.0, -10.0).item() == pytest.approx(_loop_siglip(image, text, 10.0, -10.0),
                                                                          rel=1e-12)
    bias = torch.tensor(0.7, dtype=torch.float64)
    assert siglip_loss(image, text, torch.tensor(3.0, dtype=torch.float64), bias).item() == pytest.approx(
        _loop_siglip(image, text, 3.0, 0.7), rel=1e-12)
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    config = transformers.SiglipConfig(
        text_config={"vocab_size": 30, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 10},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "image_size": 16, "patch_size": 8},
    )
    model = transformers.SiglipModel(config).double().eval()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(10.0))  # SigLIP's initial t' and b, not transformers' zeros
        model.logit_bias.fill_(-10.0)
        out = model(input_ids=torch.randint(0, 30, (4, 6)),
                    pixel_values=torch.rand(4, 3, 16, 16, dtype=torch.float64), return_loss=True)
    ours = siglip_loss(out.image_embeds, out.text_embeds, model.logit_scale.exp(), model.logit_bias)
    torch.testing.assert_close(ours, out.loss, rtol=1e-12, atol=1e-12)  # float64, rounding order only


def test_siglip_loss_gradients_and_exchange_symmetry():
    torch.manual_seed(12)
    image, text = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    torch.testing.assert_close(siglip_loss(text, image, 5.0, -2.0), siglip_loss(image, text, 5.0, -2.0),
                               rtol=1e-14, atol=1e-14)  # the signs z are symmetric: transposing changes nothing
    t = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(-3.0, dtype=torch.float64, requires_grad=True)
    siglip_loss(image, text, t.exp(), b).backward()
    eps = 1e-6
    d_t = (siglip_loss(image, text, math.exp(1.5 + eps), -3.0) - siglip_loss(image, text, math.exp(1.5 - eps),
                                                                             -3.0)) / (2 * eps)
    d_b = (siglip_loss(image, text, math.exp(1.5), -3.0 + eps) - siglip_loss(image, text, math.exp(1.5),
                                                                             -3.0 - eps)) / (2 * eps)
    assert t.grad.item() == pytest.approx(d_t.item(), rel=1e-6)
    assert b.grad.item() == pytest.approx(d_b.item(), rel=1e-6)


@pytest.mark.parametrize(
    ("image", "text", "scale", "bias", "error", "match"),
    [
        (torch.randn(4, 3), torch.randn(5, 3), 1.0, 0.0, ValueError, "siglip_loss: image_embeds and text_embeds"),
        (torch.randn(4), torch.randn(4), 1.0, 0.0, ValueError, "siglip_loss: image_embeds must have shape"),
        (torch.randn(4, 3), torch.randn(4, 3), 0.0, 0.0, ValueError, "siglip_loss: logit_scale must be positive"),
        (torch.randn(4, 3), torch.randn(4, 3), 1.0, math.nan, ValueError, "siglip_loss: logit_bias"),
        (torch.randn(4, 3), torch.randn(4, 3), 1.0, torch.tensor([1.0, 2.0]), ValueError, "logit_bias"),
        (torch.randn(4, 3), torch.randn(4, 3), 1.0, torch.tensor(math.inf), ValueError, "logit_bias must be finite"),
        (torch.randn(4, 3), torch.randn(4, 3), 1.0, "0", TypeError, "siglip_loss: logit_bias must be a number"),
        (torch.randn(4, 3), torch.randn(4, 3), 1.0, torch.tensor(1), TypeError, "logit_bias must be a floating"),
        (torch.randn(4, 3), torch.randn(4, 3).double(), 1.0, 0.0, TypeError, "siglip_loss: text_embeds and image_"),
        (torch.randint(0, 3, (4, 3)), torch.randn(4, 3), 1.0, 0.0, TypeError, "text_embeds|image_embeds"),
    ],
)
def test_siglip_loss_rejects_bad_input(image, text, scale, bias, error, match):
    with pytest.raises(error, match=match):
        siglip_loss(image, text, scale, bias)


def test_train_dual_encoder_siglip_and_contrast_size():
    media, ids, lengths, labels = _toy_pairs()
    torch.manual_seed(13)
    model = DualEncoder(nn.Linear(6, 8), BagOfWordsEncoder(10, embed_dim=8, d_model=8), init_temperature=0.1,
                        init_logit_bias=-10.0)
    assert isinstance(model.logit_bias, nn.Parameter) and model.logit_bias.item() == -10.0
    history = train_dual_encoder(model, media, ids, lengths, epochs=15, batch_size=6, lr=3e-2, seed=0,
                                 groups=labels, loss="siglip")
    assert history[-1] < history[0] and model.logit_bias.item() != -10.0
    model.eval()
    sim = encode(model.encode_media, media) @ encode(model.encode_text, ids, lengths).T
    assert recall_at_k(sim, 1, labels[:, None] == labels[None, :]) >= 0.9
    # contrast_size = batch_size is the whole batch: bit-identical training; a smaller one changes it
    runs = []
    for contrast_size in (None, 6, 2):
        torch.manual_seed(14)
        model = DualEncoder(nn.Linear(6, 8), BagOfWordsEncoder(10, embed_dim=8, d_model=8))
        runs.append(train_dual_encoder(model, media, ids, lengths, epochs=2, batch_size=6, seed=1, groups=labels,
                                       contrast_size=contrast_size))
    assert runs[0] == runs[1] and runs[0] != runs[2]
    # chunks of 2 average the per-chunk losses: the first epoch's first chunk losses are each at most log 2 + ...
    assert all(math.isfinite(x) for x in runs[2])


def test_decay_groups_spare_scale_bias_and_vectors():
    model = DualEncoder(nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8)), BagOfWordsEncoder(10, embed_dim=8),
                        init_logit_bias=-10.0)
    decayed, spared = decay_groups(model, 0.1)
    assert decayed["weight_decay"] == 0.1 and spared["weight_decay"] == 0.0
    ids = {id(p) for p in spared["params"]}
    assert id(model.log_logit_scale) in ids and id(model.logit_bias) in ids
    assert all(p.ndim >= 2 for p in decayed["params"]) and all(p.ndim < 2 for p in spared["params"])
    assert len(decayed["params"]) + len(spared["params"]) == len(list(model.parameters()))
    with pytest.raises(TypeError, match="decay_groups: model must be an nn.Module"):
        decay_groups("model", 0.1)
    with pytest.raises(ValueError, match="decay_groups: weight_decay must be a number >= 0"):
        decay_groups(model, -1.0)


def test_train_dual_encoder_leaves_scale_and_bias_undecayed():
    """With lr far too small to move anything by gradient, weight decay alone would shrink a decayed parameter by
    the factor (1 - lr * wd) per step; the logit scale, the bias and the LayerNorm gains must not move that way."""
    media, ids, lengths, labels = _toy_pairs(12)
    torch.manual_seed(18)
    model = DualEncoder(nn.Linear(6, 8), BagOfWordsEncoder(10, embed_dim=8, d_model=8), init_logit_bias=-10.0)
    with torch.no_grad():
        model.log_logit_scale.fill_(3.0)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    # six steps at a learning rate of at most 1e-7 with weight decay 1e6: decay multiplies a decayed weight by
    # about 0.74 in all, while the Adam steps move any parameter by about 6e-7 at most
    train_dual_encoder(model, media, ids, lengths, epochs=1, batch_size=2, lr=1e-7, weight_decay=1e6,
                       loss="siglip")
    after = dict(model.named_parameters())
    for name in ("log_logit_scale", "logit_bias", "text_encoder.head.0.weight"):
        assert (after[name] - before[name]).abs().max() < 1e-5, name
    assert (after["media_encoder.weight"].abs() < 0.9 * before["media_encoder.weight"].abs() + 1e-6).all()


def test_train_dual_encoder_rejects_bad_loss_options():
    media, ids, lengths, _ = _toy_pairs(12)
    plain = DualEncoder(nn.Linear(6, 8), BagOfWordsEncoder(10, embed_dim=8))
    with pytest.raises(ValueError, match="train_dual_encoder: loss='siglip' needs a model with a logit_bias"):
        train_dual_encoder(plain, media, ids, lengths, loss="siglip")
    with pytest.raises(ValueError, match="train_dual_encoder: loss must be one of"):
        train_dual_encoder(plain, media, ids, lengths, loss="infonce")
    with pytest.raises(ValueError, match="train_dual_encoder: contrast_size must be"):
        train_dual_encoder(plain, media, ids, lengths, contrast_size=1)
    with pytest.raises(TypeError, match="train_dual_encoder: contrast_size must be an int"):
        train_dual_encoder(plain, media, ids, lengths, contrast_size=2.5)
    biased = DualEncoder(nn.Linear(6, 8), BagOfWordsEncoder(10, embed_dim=8), init_logit_bias=-1.0)
    with pytest.raises(ValueError, match="train_dual_encoder: contrast_size and hard_negatives cannot be combined"):
        train_dual_encoder(plain, media, ids, lengths, contrast_size=4,
                           hard_negatives=lambda rows: (ids[rows], lengths[rows]))
    with pytest.raises(ValueError, match="hard_negatives works with loss='clip' only"):
        train_dual_encoder(biased, media, ids, lengths, loss="siglip",
                           hard_negatives=lambda rows: (ids[rows], lengths[rows]))
    with pytest.raises(ValueError, match="DualEncoder: init_logit_bias must be a finite number"):
        DualEncoder(nn.Linear(6, 8), BagOfWordsEncoder(10, embed_dim=8), init_logit_bias=math.inf)


def test_distinct_group_batches_public():
    labels = torch.arange(50) % 7
    batches = distinct_group_batches(labels, 5, seed=2)
    assert sorted(torch.cat(batches).tolist()) == list(range(50))
    assert all(len(set(labels[b].tolist())) == len(b) <= 5 for b in batches)
    assert [b.tolist() for b in batches] == [b.tolist() for b in distinct_group_batches(labels, 5, seed=2)]
    assert max(b.numel() for b in distinct_group_batches(labels, 100)) == 7  # at most one item per group
    for bad in (labels.float(), labels[None], torch.zeros(0, dtype=torch.int64), labels.bool(), [0, 1]):
        with pytest.raises(ValueError, match="distinct_group_batches: groups must be"):
            distinct_group_batches(bad, 4)
    with pytest.raises(ValueError, match="distinct_group_batches: batch_size"):
        distinct_group_batches(labels, 0)


def test_converse_caption():
    caption = "a red circle left of a blue square"
    assert converse_caption(caption) == "a blue square right of a red circle"
    assert converse_caption(converse_caption(caption)) == caption
    assert converse_caption("a green triangle above a red circle and a blue square") == \
        "a red circle below a green triangle and a blue square"
    assert sorted(converse_caption(caption).split()) == sorted(caption.replace("left", "right").split())
    with pytest.raises(ValueError, match="converse_caption: caption must look like"):
        converse_caption("a red circle")
    with pytest.raises(TypeError, match="converse_caption: caption must be a str"):
        converse_caption(None)
