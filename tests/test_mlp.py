import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmbook.calculus import numerical_gradient
from mmbook.mlp import (
    ACTIVATIONS,
    NumpyMLP,
    activation,
    activation_derivative,
    cross_entropy,
    numerical_gradients,
    one_hot,
    relative_error,
    softmax,
    softmax_cross_entropy_grad,
)

# float64 on both sides; only the summation order differs, so agreement is at the level of a few ulps.
F64 = {"rtol": 1e-10, "atol": 1e-12}
TORCH_ACT = {"relu": torch.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid}


def _batch(n=6, d=5, c=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)), rng.integers(0, c, size=n)


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_activation_and_derivative_match_torch(name):
    z = np.linspace(-4, 4, 41) + 0.05  # avoid the ReLU kink at exactly 0
    zt = torch.from_numpy(z).requires_grad_(True)
    out = TORCH_ACT[name](zt)
    out.sum().backward()
    np.testing.assert_allclose(activation(name, z), out.detach().numpy(), **F64)
    np.testing.assert_allclose(activation_derivative(name, z), zt.grad.numpy(), **F64)


def test_activation_bad_input():
    with pytest.raises(ValueError, match=r"activation must be one of \('relu', 'tanh', 'sigmoid'\), got 'gelu'"):
        activation("gelu", np.zeros(3))
    with pytest.raises(ValueError, match="got 'elu'"):
        activation_derivative("elu", np.zeros(3))
    with pytest.raises(TypeError, match="z must be a numpy.ndarray, got list"):
        activation("relu", [1.0, 2.0])
    with pytest.raises(TypeError, match="z must be a numpy.ndarray, got Tensor"):
        activation_derivative("tanh", torch.zeros(3))


def test_softmax_cross_entropy_and_grad_match_torch():
    logits, y = _batch(7, 4, 4)
    logits = logits * 10  # large logits exercise the stabilisation
    lt = torch.from_numpy(logits).requires_grad_(True)
    loss = F.cross_entropy(lt, torch.from_numpy(y))
    loss.backward()
    np.testing.assert_allclose(softmax(logits), torch.softmax(lt, 1).detach().numpy(), **F64)
    assert cross_entropy(logits, y) == pytest.approx(loss.item(), rel=1e-12)
    np.testing.assert_allclose(softmax_cross_entropy_grad(logits, y), lt.grad.numpy(), **F64)
    np.testing.assert_array_equal(one_hot(np.array([2, 0]), 3), [[0, 0, 1], [1, 0, 0]])
    assert np.isfinite(cross_entropy(np.array([[1000.0, -1000.0]]), np.array([1])))


def test_softmax_cross_entropy_grad_matches_finite_differences():
    logits, y = _batch(5, 3, 3)
    # return a float64 tensor: calculus.numerical_gradient turns a Python float into a float32 tensor
    f = lambda t: torch.tensor(cross_entropy(t.numpy(), y), dtype=torch.float64)  # noqa: E731
    fd = numerical_gradient(f, torch.from_numpy(logits), eps=1e-5).numpy()
    # central differences in float64 with eps=1e-5: truncation ~eps^2, round-off ~1e-16/eps
    np.testing.assert_allclose(softmax_cross_entropy_grad(logits, y), fd, rtol=0, atol=1e-9)


def test_loss_functions_bad_input():
    logits, y = _batch(4, 3, 3)
    with pytest.raises(ValueError, match=r"logits must have 2 dimension\(s\), got shape \(3,\)"):
        softmax(np.zeros(3))
    with pytest.raises(ValueError, match=r"y must have shape \(4,\) to match the batch, got \(3,\)"):
        cross_entropy(logits, y[:3])
    with pytest.raises(ValueError, match=r"y must lie in \[0, 3\), got values in \[0, 5\]"):
        softmax_cross_entropy_grad(logits, np.array([0, 1, 2, 5]))
    with pytest.raises(TypeError, match="y must hold integer class indices, got dtype float64"):
        cross_entropy(logits, y.astype(float))
    with pytest.raises(ValueError, match="num_classes must be a positive int, got 0"):
        one_hot(np.array([0]), 0)
    with pytest.raises(ValueError, match="y must be a 1-D numpy.ndarray"):
        one_hot(np.zeros((2, 2), dtype=int), 3)
    with pytest.raises(ValueError, match="at least one row"):
        cross_entropy(np.zeros((0, 3)), np.zeros(0, dtype=int))


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_backprop_matches_finite_differences(name):
    X, y = _batch(6, 5, 3, seed=1)
    model = NumpyMLP([5, 4, 4, 3], activation=name, seed=2)
    loss, grads = model.loss_and_grads(X, y)
    assert loss == pytest.approx(model.loss(X, y))
    fd = numerical_gradients(lambda: model.loss(X, y), model.params, eps=1e-5)
    assert list(grads) == list(model.params) == ["W1", "b1", "W2", "b2", "W3", "b3"]
    assert max(relative_error(grads[k], fd[k]) for k in grads) < 1e-7


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_backprop_matches_autograd_with_copied_weights(name):
    X, y = _batch(6, 5, 3, seed=3)
    model = NumpyMLP([5, 7, 3], activation=name, seed=4)
    net = model.to_torch()
    assert isinstance(net, nn.Sequential) and len(net) == 3
    logits = net(torch.from_numpy(X))
    F.cross_entropy(logits, torch.from_numpy(y)).backward()
    ours_logits, cache = model.forward(X)
    np.testing.assert_allclose(ours_logits, logits.detach().numpy(), **F64)
    grads = model.backward(cache, softmax_cross_entropy_grad(ours_logits, y))
    ref = {"W1": net[0].weight, "b1": net[0].bias, "W2": net[2].weight, "b2": net[2].bias}
    for key, p in ref.items():
        np.testing.assert_allclose(grads[key], p.grad.numpy(), **F64)


def test_numerical_gradients_restores_params_and_matches_a_known_gradient():
    params = {"w": np.array([1.0, -2.0, 0.5])}
    before = params["w"].copy()
    g = numerical_gradients(lambda: float(np.sum(params["w"] ** 3)), params, eps=1e-5)
    np.testing.assert_array_equal(params["w"], before)
    np.testing.assert_allclose(g["w"], 3 * before**2, rtol=1e-9)
    assert relative_error(np.zeros(2), np.zeros(2)) == 0.0
    assert relative_error(np.array([1.0, 0.0]), np.array([0.0, 1.0])) == pytest.approx(np.sqrt(2) / 2)


def test_numerical_gradients_and_relative_error_bad_input():
    with pytest.raises(TypeError, match="loss_fn must be callable, got int"):
        numerical_gradients(3, {"w": np.zeros(2)})
    with pytest.raises(ValueError, match="params must be a non-empty mapping"):
        numerical_gradients(lambda: 0.0, {})
    with pytest.raises(ValueError, match="eps must be a positive number, got 0"):
        numerical_gradients(lambda: 0.0, {"w": np.zeros(2)}, eps=0)
    with pytest.raises(TypeError, match=r"params\['w'\] must be a float64 numpy.ndarray, got float32"):
        numerical_gradients(lambda: 0.0, {"w": np.zeros(2, dtype=np.float32)})
    with pytest.raises(ValueError, match=r"same shape, got \(2,\) and \(3,\)"):
        relative_error(np.zeros(2), np.zeros(3))


def test_model_shapes_init_and_step():
    model = NumpyMLP([64, 32, 10], activation="relu", seed=0)
    assert {k: v.shape for k, v in model.params.items()} == {"W1": (32, 64), "b1": (32,), "W2": (10, 32), "b2": (10,)}
    assert model.num_parameters == 64 * 32 + 32 + 32 * 10 + 10
    assert np.std(model.params["W1"]) == pytest.approx(np.sqrt(2 / 64), rel=0.1)  # He initialisation
    same = NumpyMLP([64, 32, 10], activation="relu", seed=0)
    np.testing.assert_array_equal(model.params["W2"], same.params["W2"])
    grads = {k: np.ones_like(v) for k, v in model.params.items()}
    before = model.params["b2"].copy()
    model.step(grads, lr=0.5)
    np.testing.assert_allclose(model.params["b2"], before - 0.5)
    assert model.predict(np.zeros((3, 64))).shape == (3,)


def test_fit_learns_a_separable_problem():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 2))
    y = (X[:, 0] * X[:, 1] > 0).astype(int)  # XOR-like: not linearly separable
    model = NumpyMLP([2, 16, 2], activation="tanh", seed=0)
    hist = model.fit(X, y, epochs=30, batch_size=20, lr=0.3, X_val=X, y_val=y)
    assert hist["epoch"] == list(range(1, 31)) and set(hist) == {"epoch", "train_loss", "val_loss", "val_acc"}
    assert hist["train_loss"][-1] < hist["train_loss"][0] and hist["val_acc"][-1] > 0.9


def test_model_bad_input():
    with pytest.raises(ValueError, match="layer_sizes must be a sequence of at least 2 ints, got"):
        NumpyMLP([4])
    with pytest.raises(ValueError, match=r"layer_sizes must be positive ints, got \[4, 0, 2\]"):
        NumpyMLP([4, 0, 2])
    with pytest.raises(ValueError, match="activation must be one of"):
        NumpyMLP([4, 2], activation="softplus")
    with pytest.raises(ValueError, match="seed must be a non-negative int, got -1"):
        NumpyMLP([4, 2], seed=-1)
    model = NumpyMLP([4, 3, 2])
    with pytest.raises(ValueError, match=r"X must have shape \(batch, 4\), got \(5, 3\)"):
        model.forward(np.zeros((5, 3)))
    with pytest.raises(TypeError, match="X must be a numpy.ndarray, got Tensor"):
        model.forward(torch.zeros(5, 4))
    logits, cache = model.forward(np.zeros((5, 4)))
    with pytest.raises(ValueError, match=r"dlogits must have the logits' shape \(5, 2\), got \(5, 3\)"):
        model.backward(cache, np.zeros((5, 3)))
    with pytest.raises(ValueError, match="cache must be the dict returned by forward"):
        model.backward({}, logits)
    with pytest.raises(ValueError, match=r"y must lie in \[0, 2\)"):
        model.loss_and_grads(np.zeros((2, 4)), np.array([0, 2]))
    grads = {k: np.zeros_like(v) for k, v in model.params.items()}
    with pytest.raises(ValueError, match="lr must be a positive finite number, got -0.1"):
        model.step(grads, lr=-0.1)
    with pytest.raises(ValueError, match="grads must have the keys"):
        model.step({"W1": grads["W1"]}, lr=0.1)
    with pytest.raises(ValueError, match=r"grads\['b2'\] must have shape \(2,\), got \(3,\)"):
        model.step({**grads, "b2": np.zeros(3)}, lr=0.1)
    with pytest.raises(ValueError, match="epochs must be a positive int, got 0"):
        model.fit(np.zeros((2, 4)), np.array([0, 1]), epochs=0)
    with pytest.raises(ValueError, match="pass both X_val and y_val"):
        model.fit(np.zeros((2, 4)), np.array([0, 1]), epochs=1, X_val=np.zeros((2, 4)))
    with pytest.raises(TypeError, match="dtype must be a floating torch.dtype"):
        model.to_torch(torch.int64)


def test_nan_never_becomes_a_prediction_and_empty_input_is_named():
    mlp = NumpyMLP([3, 4, 2])
    with pytest.raises(ValueError, match="NumpyMLP.forward: X contains NaN"):
        mlp.predict(np.full((2, 3), np.nan))  # the arg-max of NaN logits would be class 0
    bad = {k: np.full_like(v, np.nan) for k, v in mlp.params.items()}
    with pytest.raises(ValueError, match=r"NumpyMLP.step: grads\['W1'\] contains NaN"):
        mlp.step(bad, 0.1)
    mlp.params["b2"][:] = np.nan
    with pytest.raises(ValueError, match="NumpyMLP.predict: the logits are not finite"):
        mlp.predict(np.ones((2, 3)))
    with pytest.raises(ValueError, match="NumpyMLP.fit: X must hold at least one example"):
        NumpyMLP([3, 2]).fit(np.zeros((0, 3)), np.zeros(0, dtype=int), epochs=1)
    with pytest.raises(ValueError, match="softmax: logits must have at least one column"):
        softmax(np.empty((2, 0)))
    with pytest.raises(ValueError, match="numerical_gradients: eps must be a positive number, got inf"):
        numerical_gradients(lambda: 0.0, {"a": np.zeros(2)}, eps=np.inf)  # would return zero gradients
