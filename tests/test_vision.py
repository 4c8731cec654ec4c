import pytest
import torch
import torch.nn.functional as F

import mmbook
from mmbook.vision import (
    SmallCNN,
    ViT,
    ViTConfig,
    conv2d,
    conv_output_size,
    load_hf_vit_weights,
    max_pool2d,
    patchify,
    receptive_field,
)

# float32: unfold+matmul and the direct/FFT/oneDNN kernel sum C_in*kH*kW products in different orders
TOL = {"rtol": 1e-5, "atol": 1e-5}


@pytest.mark.parametrize("stride,padding", [(1, 0), (2, 1), ((1, 2), (2, 0)), (3, 2)])
def test_conv2d_matches_torch(stride, padding):
    mmbook.set_seed(0)
    x, w, b = torch.randn(2, 3, 11, 13), torch.randn(5, 3, 3, 4), torch.randn(5)
    torch.testing.assert_close(conv2d(x, w, b, stride, padding), F.conv2d(x, w, b, stride, padding), **TOL)
    torch.testing.assert_close(conv2d(x, w, None, stride, padding), F.conv2d(x, w, None, stride, padding), **TOL)


def test_max_pool_matches_torch():
    mmbook.set_seed(0)
    x = torch.randn(2, 3, 9, 8)
    torch.testing.assert_close(max_pool2d(x, 2), F.max_pool2d(x, 2), rtol=0, atol=0)
    torch.testing.assert_close(max_pool2d(x, 3, 2), F.max_pool2d(x, 3, 2), rtol=0, atol=0)


def test_output_size_formula():
    assert conv_output_size(32, 5, 1, 2) == 32 and conv_output_size(8, 3, 2, 0) == 3


def test_bad_input():
    x, w = torch.randn(1, 3, 8, 8), torch.randn(4, 2, 3, 3)
    with pytest.raises(ValueError, match="weight expects C_in=2 channels but x has 3"):
        conv2d(x, w)
    with pytest.raises(ValueError, match=r"x must have shape \(batch, C_in, H, W\), got \(3, 8, 8\)"):
        conv2d(x[0], w)
    with pytest.raises(ValueError, match=r"bias must have shape \(4,\)"):
        conv2d(x, torch.randn(4, 3, 3, 3), torch.randn(3))
    with pytest.raises(ValueError, match="stride must be an int >= 1"):
        conv2d(x, torch.randn(4, 3, 3, 3), stride=0)
    with pytest.raises(ValueError, match="too small for kernel"):
        conv2d(torch.randn(1, 3, 2, 2), torch.randn(4, 3, 3, 3))
    with pytest.raises(TypeError, match="floating-point"):
        conv2d(x.long(), w)


# ----------------------------------------------------------------------------- receptive field, patches


def _field_by_autograd(kernels, strides, size=64):
    """Width of the input region that influences the central output unit, found by autograd."""
    x = torch.zeros(1, 1, size, size, requires_grad=True)
    h = x
    for k, s in zip(kernels, strides, strict=True):
        h = F.conv2d(h, torch.ones(1, 1, k, k), stride=s)
    h[0, 0, h.shape[2] // 2, h.shape[3] // 2].backward()
    cols = (x.grad[0, 0] != 0).any(dim=0).nonzero()
    return int(cols.max() - cols.min() + 1)


@pytest.mark.parametrize("kernels,strides", [([3], [1]), ([3, 3, 3], [1, 1, 1]), ([3, 2, 3, 2], [1, 2, 1, 2]),
                                             ([5, 3, 3], [2, 2, 1])])
def test_receptive_field_matches_autograd(kernels, strides):
    assert receptive_field(kernels, strides) == _field_by_autograd(kernels, strides)


def test_receptive_field_bad_input():
    with pytest.raises(ValueError, match="kernel_sizes must be a non-empty sequence"):
        receptive_field([])
    with pytest.raises(ValueError, match="strides must be 2 ints"):
        receptive_field([3, 3], [1])
    with pytest.raises(ValueError, match="kernel_sizes must be a non-empty sequence"):
        receptive_field(3)


def test_patchify_is_the_strided_convolution():
    mmbook.set_seed(0)
    x, w, b = torch.randn(2, 3, 8, 12), torch.randn(6, 3, 4, 4), torch.randn(6)
    patches = patchify(x, 4)
    assert patches.shape == (2, 6, 48)
    torch.testing.assert_close(patches[0, 1], x[0, :, 0:4, 4:8].reshape(-1), rtol=0, atol=0)  # row-major order
    ref = F.conv2d(x, w, b, stride=4).flatten(2).transpose(1, 2)
    torch.testing.assert_close(patches @ w.reshape(6, -1).T + b, ref, **TOL)


def test_patchify_bad_input():
    with pytest.raises(ValueError, match="not a multiple of patch_size 3"):
        patchify(torch.randn(1, 1, 8, 8), 3)
    with pytest.raises(ValueError, match="images must be a tensor"):
        patchify(torch.randn(8, 8), 2)
    with pytest.raises(ValueError, match="patch_size must be a positive int"):
        patchify(torch.randn(1, 1, 8, 8), 0)


# ----------------------------------------------------------------------------- SmallCNN


def test_small_cnn_shapes_and_encoder_mode():
    mmbook.set_seed(0)
    digits = SmallCNN(1, 10, width=8, num_blocks=2).eval()
    x = torch.randn(4, 1, 8, 8)
    assert digits.features(x).shape == (4, 16, 2, 2) and digits.embed(x).shape == (4, 16)
    assert digits(x).shape == (4, 10)
    torch.testing.assert_close(digits(x), digits.head(digits.features(x).mean(dim=(2, 3))), rtol=0, atol=0)
    scenes = SmallCNN(3, None, width=8, num_blocks=3).eval()
    assert scenes.feature_dim == 32 and scenes(torch.rand(2, 3, 32, 32)).shape == (2, 32)


def test_small_cnn_learns_a_batch():
    mmbook.set_seed(0)
    model = SmallCNN(1, 3, width=8)
    x, y = torch.randn(12, 1, 8, 8), torch.arange(12) % 3
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    for _ in range(25):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert (model.eval()(x).argmax(-1) == y).all()


def test_small_cnn_bad_input():
    model = SmallCNN(1, 10)
    with pytest.raises(ValueError, match=r"images must have shape \(batch, 1, H, W\), got \(2, 3, 8, 8\)"):
        model(torch.randn(2, 3, 8, 8))
    with pytest.raises(TypeError, match="floating-point"):
        model(torch.zeros(2, 1, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="too small for 2 pooling blocks"):
        model(torch.randn(2, 1, 3, 3))
    with pytest.raises(ValueError, match="width must be a positive int"):
        SmallCNN(1, 10, width=0)
    with pytest.raises(ValueError, match="dropout must be in"):
        SmallCNN(1, 10, dropout=1.5)


# ----------------------------------------------------------------------------- ViT


def _hf_pair(num_labels=None):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    ours_cfg = ViTConfig(image_size=8, patch_size=2, in_channels=3, d_model=16, num_heads=2, num_layers=2, d_ff=24,
                         num_classes=num_labels)
    hf_cfg = transformers.ViTConfig(image_size=8, patch_size=2, num_channels=3, hidden_size=16, num_attention_heads=2,
                                    num_hidden_layers=2, intermediate_size=24, layer_norm_eps=1e-6,
                                    hidden_act="gelu", num_labels=num_labels or 2)
    return ours_cfg, hf_cfg, transformers


def test_vit_matches_transformers_vit_model_and_classifier():
    ours_cfg, hf_cfg, transformers = _hf_pair()
    mmbook.set_seed(0)
    hf = transformers.ViTModel(hf_cfg, add_pooling_layer=False).eval()
    ours = load_hf_vit_weights(ViT(ours_cfg), hf).eval()
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        ref = hf(pixel_values=x).last_hidden_state
        torch.testing.assert_close(ours.features(x), ref, **TOL)
        torch.testing.assert_close(ours(x), ref[:, 0], **TOL)
    ours_cfg, hf_cfg, _ = _hf_pair(num_labels=5)
    hf = transformers.ViTForImageClassification(hf_cfg).eval()
    ours = load_hf_vit_weights(ViT(ours_cfg), hf).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(pixel_values=x).logits, **TOL)


def test_vit_shapes_and_mean_pool():
    mmbook.set_seed(0)
    model = ViT(ViTConfig(image_size=8, patch_size=4, d_model=8, num_heads=2, num_classes=None, pool="mean")).eval()
    x = torch.randn(2, 1, 8, 8)
    tokens = model.features(x)
    assert tokens.shape == (2, 5, 8) and model.config.num_patches == 4
    torch.testing.assert_close(model(x), tokens[:, 1:].mean(dim=1), rtol=0, atol=0)


def test_vit_bad_input():
    with pytest.raises(ValueError, match="image_size 10 is not a multiple of patch_size 4"):
        ViTConfig(image_size=10, patch_size=4)
    with pytest.raises(ValueError, match="must be divisible by num_heads"):
        ViTConfig(d_model=30, num_heads=4)
    with pytest.raises(ValueError, match="pool must be 'cls' or 'mean'"):
        ViTConfig(pool="max")
    with pytest.raises(TypeError, match="config must be a ViTConfig"):
        ViT({"d_model": 8})
    model = ViT(ViTConfig())
    with pytest.raises(ValueError, match="images must be 8x8, got 16x16"):
        model(torch.randn(1, 1, 16, 16))
    ours_cfg, hf_cfg, transformers = _hf_pair()
    hf_cfg.layer_norm_eps = 1e-12
    with pytest.raises(ValueError, match="layer_norm_eps: theirs 1e-12, ours 1e-06"):
        load_hf_vit_weights(ViT(ours_cfg), transformers.ViTModel(hf_cfg))
    with pytest.raises(TypeError, match="hf_model must be a transformers ViTModel"):
        load_hf_vit_weights(ViT(ours_cfg), torch.nn.Linear(2, 2))


def test_nonsense_sizes_and_dtype_mixes_are_named():
    from mmbook.vision import ViTBlock

    with pytest.raises(ValueError, match="conv_output_size: kernel must be a positive int, got 0"):
        conv_output_size(5, 0)  # returned 6
    with pytest.raises(ValueError, match="conv_output_size: stride must be a positive int, got 0"):
        conv_output_size(5, 3, stride=0)  # ZeroDivisionError
    with pytest.raises(ValueError, match="conv_output_size: padding must be an int >= 0, got -1"):
        conv_output_size(5, 3, padding=-1)
    with pytest.raises(TypeError, match="conv_output_size: size must be an int, got float"):
        conv_output_size(5.5, 3)
    x, w = torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3)
    with pytest.raises(TypeError, match="conv2d: weight and x must have the same dtype"):
        conv2d(x, w.double())  # not "expected scalar type Float but found Double"
    with pytest.raises(TypeError, match="conv2d: bias and x must have the same dtype"):
        conv2d(x, w, torch.zeros(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="conv2d: weight must not have an empty dimension"):
        conv2d(x, torch.randn(4, 3, 0, 3))
    with pytest.raises(TypeError, match="max_pool2d: x must be a floating-point tensor"):
        max_pool2d(x.long(), 2)
    with pytest.raises(TypeError, match="SmallCNN: batch_norm must be True or False"):
        SmallCNN(batch_norm="no")
    with pytest.raises(TypeError, match="SmallCNN: images has dtype torch.float64"):
        SmallCNN(in_channels=3)(x.double())
    with pytest.raises(TypeError, match="ViT: images has dtype torch.float64"):
        ViT(ViTConfig())(torch.randn(2, 1, 8, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="ViTConfig: layer_norm_eps must be a positive number, got inf"):
        ViTConfig(layer_norm_eps=float("inf"))
    block = ViTBlock(ViTConfig())
    with pytest.raises(ValueError, match=r"ViTBlock: x must have shape \(batch, seq, 32\), got \(2, 5, 6\)"):
        block(torch.randn(2, 5, 6))
    with pytest.raises(TypeError, match="ViTBlock: config must be a ViTConfig, got dict"):
        ViTBlock({})
