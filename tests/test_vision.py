import pytest
import torch
import torch.nn.functional as F

import mmbook
from mmbook.vision import conv2d, conv_output_size, max_pool2d

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
