"""A multilayer perceptron in NumPy with hand-derived backpropagation (chapter 02).

Conventions (used throughout the chapter and this module):

* a batch is a matrix ``X`` of shape ``(batch, features)``: one example per **row**;
* layer ``l`` maps ``a^(l-1)`` to ``z^(l) = W^(l) a^(l-1) + b^(l)`` for one example, with ``W^(l)`` of shape
  ``(n_l, n_{l-1})`` (the layout of ``torch.nn.Linear.weight``); for a batch, ``Z^(l) = A^(l-1) W^(l)T + b^(l)``;
* hidden layers apply the activation ``A^(l) = f(Z^(l))``; the last layer's ``Z^(L)`` are the logits;
* the loss is the mean softmax cross-entropy over the batch, whose gradient with respect to the logits is
  ``(P - Y) / batch`` (``P`` the softmax probabilities, ``Y`` the one-hot targets).

Everything is float64 NumPy, so gradients can be checked against finite differences to ~1e-9.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from mmbook.checks import check_number
from mmbook.core import numpy_rng

__all__ = [
    "ACTIVATIONS",
    "NumpyMLP",
    "activation",
    "activation_derivative",
    "cross_entropy",
    "numerical_gradients",
    "one_hot",
    "relative_error",
    "softmax",
    "softmax_cross_entropy_grad",
]

ACTIVATIONS = ("relu", "tanh", "sigmoid")
# Variance gain of the initialisation: W ~ N(0, gain / fan_in). He et al. (2015) for ReLU, LeCun for the others.
_INIT_GAIN = {"relu": 2.0, "tanh": 1.0, "sigmoid": 1.0}


# ----------------------------------------------------------------------------------------------- input checks
def _check_name(name: object, fn: str) -> str:
    if not isinstance(name, str) or name not in ACTIVATIONS:
        raise ValueError(f"{fn}: activation must be one of {ACTIVATIONS}, got {name!r}")
    return name


def _as_float_array(x: object, arg: str, fn: str, ndim: int | None = None) -> np.ndarray:
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{fn}: {arg} must be a numpy.ndarray, got {type(x).__name__}")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise TypeError(f"{fn}: {arg} must hold real numbers, got dtype {x.dtype}")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{fn}: {arg} must have {ndim} dimension(s), got shape {x.shape}")
    return x.astype(np.float64, copy=False)


def _check_labels(y: object, batch: int, num_classes: int, fn: str) -> np.ndarray:
    if not isinstance(y, np.ndarray):
        raise TypeError(f"{fn}: y must be a numpy.ndarray of class indices, got {type(y).__name__}")
    if not np.issubdtype(y.dtype, np.integer):
        raise TypeError(f"{fn}: y must hold integer class indices, got dtype {y.dtype}")
    if y.shape != (batch,):
        raise ValueError(f"{fn}: y must have shape ({batch},) to match the batch, got {y.shape}")
    if batch and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"{fn}: y must lie in [0, {num_classes}), got values in [{y.min()}, {y.max()}]")
    return y


# ----------------------------------------------------------------------------------------------- functions
def activation(name: str, z: np.ndarray) -> np.ndarray:
    """Apply the activation ``name`` (``"relu"``, ``"tanh"`` or ``"sigmoid"``) elementwise; same shape as ``z``."""
    _check_name(name, "activation")
    z = _as_float_array(z, "z", "activation")
    if name == "relu":
        return np.maximum(z, 0.0)
    if name == "tanh":
        return np.tanh(z)
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # the logistic sigmoid, written so that it never overflows


def activation_derivative(name: str, z: np.ndarray) -> np.ndarray:
    """The derivative ``f'(z)`` of the activation, evaluated at the **pre-activation** ``z``; same shape as ``z``.

    ``relu'(z) = 1[z > 0]`` (we take 0 at the kink), ``tanh'(z) = 1 - tanh(z)^2``,
    ``sigmoid'(z) = s(z) (1 - s(z))``.
    """
    _check_name(name, "activation_derivative")
    z = _as_float_array(z, "z", "activation_derivative")
    if name == "relu":
        return (z > 0).astype(np.float64)
    a = activation(name, z)
    return 1.0 - a * a if name == "tanh" else a * (1.0 - a)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of ``logits`` ``(batch, num_classes)``, shifted by the row maximum for stability."""
    logits = _as_float_array(logits, "logits", "softmax", ndim=2)
    if logits.shape[1] == 0:
        raise ValueError(f"softmax: logits must have at least one column, got shape {logits.shape}")
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def one_hot(y: np.ndarray, num_classes: int) -> np.ndarray:
    """One-hot matrix ``(batch, num_classes)`` of float64 for integer labels ``y`` of shape ``(batch,)``."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(f"one_hot: num_classes must be a positive int, got {num_classes!r}")
    if not isinstance(y, np.ndarray) or y.ndim != 1:
        raise ValueError(f"one_hot: y must be a 1-D numpy.ndarray of class indices, got {getattr(y, 'shape', y)!r}")
    y = _check_labels(y, y.shape[0], int(num_classes), "one_hot")
    out = np.zeros((y.shape[0], int(num_classes)))
    out[np.arange(y.shape[0]), y] = 1.0
    return out


def cross_entropy(logits: np.ndarray, y: np.ndarray) -> float:
    """Mean cross-entropy ``-(1/B) sum_n log softmax(logits)[n, y_n]`` of ``logits`` ``(B, C)`` and labels ``(B,)``.

    Computed with the log-sum-exp trick, so it is finite for any finite logits.
    """
    logits = _as_float_array(logits, "logits", "cross_entropy", ndim=2)
    y = _check_labels(y, logits.shape[0], logits.shape[1], "cross_entropy")
    if logits.shape[0] == 0:
        raise ValueError("cross_entropy: logits must hold at least one row, got batch size 0")
    m = logits.max(axis=1, keepdims=True)
    log_z = m[:, 0] + np.log(np.exp(logits - m).sum(axis=1))
    return float(np.mean(log_z - logits[np.arange(logits.shape[0]), y]))


def softmax_cross_entropy_grad(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Gradient of :func:`cross_entropy` with respect to ``logits``: ``(P - Y) / B``, shape ``(B, C)``."""
    logits = _as_float_array(logits, "logits", "softmax_cross_entropy_grad", ndim=2)
    y = _check_labels(y, logits.shape[0], logits.shape[1], "softmax_cross_entropy_grad")
    if logits.shape[0] == 0:
        raise ValueError("softmax_cross_entropy_grad: logits must hold at least one row, got batch size 0")
    return (softmax(logits) - one_hot(y, logits.shape[1])) / logits.shape[0]


def numerical_gradients(
    loss_fn: Callable[[], float], params: Mapping[str, np.ndarray], eps: float = 1e-6
) -> dict[str, np.ndarray]:
    """Central finite differences of a scalar ``loss_fn()`` with respect to every entry of every array in ``params``.

    Each entry is perturbed **in place** by ``+eps`` and ``-eps``, ``loss_fn()`` (which must read the arrays) is
    called, and the entry is restored exactly. Returns a dict with the same keys and shapes as ``params``. Use
    float64 arrays: the truncation error is O(eps^2) and the round-off error O(u |loss| / eps).
    """
    if not callable(loss_fn):
        raise TypeError(f"numerical_gradients: loss_fn must be callable, got {type(loss_fn).__name__}")
    if not isinstance(params, Mapping) or not params:
        raise ValueError(f"numerical_gradients: params must be a non-empty mapping of name -> array, got {params!r}")
    check_number("eps", eps, "numerical_gradients", 0.0, low_open=True)
    grads: dict[str, np.ndarray] = {}
    for key, p in params.items():
        if not isinstance(p, np.ndarray) or p.dtype != np.float64:
            raise TypeError(f"numerical_gradients: params[{key!r}] must be a float64 numpy.ndarray, got "
                            f"{getattr(p, 'dtype', type(p).__name__)}")
        g = np.zeros_like(p)
        for idx in np.ndindex(p.shape):
            old = p[idx]
            p[idx] = old + eps
            plus = float(loss_fn())
            p[idx] = old - eps
            minus = float(loss_fn())
            p[idx] = old
            g[idx] = (plus - minus) / (2 * eps)
        grads[key] = g
    return grads


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    """Norm-wise relative error ``||a - b|| / (||a|| + ||b||)`` of two arrays of the same shape (0 if both are 0).

    Unlike the entrywise maximum of ``|a_i - b_i| / (|a_i| + |b_i|)``, it is not dominated by entries whose true
    value is tiny, where a finite difference's absolute error of ~1e-10 is all that is left.
    """
    a = _as_float_array(a, "a", "relative_error")
    b = _as_float_array(b, "b", "relative_error")
    if a.shape != b.shape:
        raise ValueError(f"relative_error: a and b must have the same shape, got {a.shape} and {b.shape}")
    denom = float(np.linalg.norm(a) + np.linalg.norm(b))
    return 0.0 if denom == 0.0 else float(np.linalg.norm(a - b)) / denom


# ----------------------------------------------------------------------------------------------- the model
class NumpyMLP:
    """A fully connected network with hand-written forward and backward passes, in float64 NumPy.

    ``layer_sizes = [n_0, n_1, ..., n_L]``: ``n_0`` input features, ``n_L`` classes, and ``L - 1`` hidden layers
    with the same ``activation``. Parameters live in :attr:`params`: ``"W1"`` of shape ``(n_1, n_0)``, ``"b1"`` of
    shape ``(n_1,)``, ..., ``"WL"``, ``"bL"``. Weights are drawn from ``N(0, gain / fan_in)`` (gain 2 for ReLU,
    1 otherwise) with ``mmbook.numpy_rng(seed)``; biases start at zero.
    """

    def __init__(self, layer_sizes: Sequence[int], activation: str = "relu", seed: int = 0) -> None:
        if isinstance(layer_sizes, (str, bytes)) or not isinstance(layer_sizes, Sequence) or len(layer_sizes) < 2:
            raise ValueError(f"NumpyMLP: layer_sizes must be a sequence of at least 2 ints, got {layer_sizes!r}")
        if any(isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1 for n in layer_sizes):
            raise ValueError(f"NumpyMLP: layer_sizes must be positive ints, got {list(layer_sizes)!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"NumpyMLP: seed must be a non-negative int, got {seed!r}")
        self.layer_sizes = tuple(int(n) for n in layer_sizes)
        self.activation = _check_name(activation, "NumpyMLP")
        self.num_layers = len(self.layer_sizes) - 1
        rng = numpy_rng(int(seed))
        gain = _INIT_GAIN[self.activation]
        self.params: dict[str, np.ndarray] = {}
        for l, (n_in, n_out) in enumerate(zip(self.layer_sizes[:-1], self.layer_sizes[1:], strict=True), start=1):
            self.params[f"W{l}"] = rng.normal(0.0, np.sqrt(gain / n_in), size=(n_out, n_in))
            self.params[f"b{l}"] = np.zeros(n_out)

    def __repr__(self) -> str:
        return f"NumpyMLP(layer_sizes={list(self.layer_sizes)}, activation={self.activation!r})"

    @property
    def num_parameters(self) -> int:
        """Total number of scalar parameters (weights and biases)."""
        return int(sum(p.size for p in self.params.values()))

    # forward ----------------------------------------------------------------------------------------------
    def _check_X(self, X: object, fn: str) -> np.ndarray:
        X = _as_float_array(X, "X", f"NumpyMLP.{fn}", ndim=2)
        if X.shape[1] != self.layer_sizes[0]:
            raise ValueError(f"NumpyMLP.{fn}: X must have shape (batch, {self.layer_sizes[0]}), got {X.shape}")
        if not np.isfinite(X).all():
            raise ValueError(f"NumpyMLP.{fn}: X contains NaN or infinite values")
        return X

    def forward(self, X: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Logits ``(batch, n_L)`` for inputs ``X`` ``(batch, n_0)``, and the cache the backward pass needs.

        The cache holds ``"A0" = X`` and, for every layer ``l``, ``"Z{l}"`` (pre-activations) and, for hidden
        layers, ``"A{l}" = f(Z{l})``.
        """
        X = self._check_X(X, "forward")
        cache = {"A0": X}
        A = X
        for l in range(1, self.num_layers + 1):
            Z = A @ self.params[f"W{l}"].T + self.params[f"b{l}"]
            cache[f"Z{l}"] = Z
            if l < self.num_layers:
                A = activation(self.activation, Z)
                cache[f"A{l}"] = A
        return Z, cache

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Predicted class indices ``(batch,)``: the arg-max of the logits."""
        logits = self.forward(X)[0]
        if not np.isfinite(logits).all():  # the arg-max of a NaN row is a plausible class
            raise ValueError("NumpyMLP.predict: the logits are not finite (did training diverge?)")
        return logits.argmax(axis=1)

    def loss(self, X: np.ndarray, y: np.ndarray) -> float:
        """Mean softmax cross-entropy of the model on ``X`` ``(batch, n_0)`` with labels ``y`` ``(batch,)``."""
        return cross_entropy(self.forward(X)[0], y)

    # backward ---------------------------------------------------------------------------------------------
    def backward(self, cache: Mapping[str, np.ndarray], dlogits: np.ndarray) -> dict[str, np.ndarray]:
        """Backpropagate ``dlogits = dLoss/dZ^(L)`` ``(batch, n_L)`` through the network.

        With ``Delta^(l) = dLoss/dZ^(l)`` of shape ``(batch, n_l)``:
        ``dW^(l) = Delta^(l)T A^(l-1)``, ``db^(l) = Delta^(l)T 1`` (sum over the batch), and
        ``Delta^(l-1) = (Delta^(l) W^(l)) * f'(Z^(l-1))`` -- the derivative at the pre-activation ``Z``.
        Returns a dict with the keys and shapes of :attr:`params`.
        """
        if not isinstance(cache, Mapping) or "A0" not in cache or f"Z{self.num_layers}" not in cache:
            raise ValueError("NumpyMLP.backward: cache must be the dict returned by forward(X)")
        dlogits = _as_float_array(dlogits, "dlogits", "NumpyMLP.backward", ndim=2)
        expected = cache[f"Z{self.num_layers}"].shape
        if dlogits.shape != expected:
            raise ValueError(f"NumpyMLP.backward: dlogits must have the logits' shape {expected}, got "
                             f"{dlogits.shape}")
        grads: dict[str, np.ndarray] = {}
        delta = dlogits
        for l in range(self.num_layers, 0, -1):
            A_prev = cache[f"A{l - 1}"]
            grads[f"W{l}"] = delta.T @ A_prev
            grads[f"b{l}"] = delta.sum(axis=0)
            if l > 1:
                delta = (delta @ self.params[f"W{l}"]) * activation_derivative(self.activation, cache[f"Z{l - 1}"])
        return {key: grads[key] for key in self.params}  # same order as params

    def loss_and_grads(self, X: np.ndarray, y: np.ndarray) -> tuple[float, dict[str, np.ndarray]]:
        """Mean cross-entropy on ``(X, y)`` and its gradient with respect to every parameter."""
        logits, cache = self.forward(X)
        loss = cross_entropy(logits, y)
        return loss, self.backward(cache, softmax_cross_entropy_grad(logits, y))

    def step(self, grads: Mapping[str, np.ndarray], lr: float) -> None:
        """One step of plain gradient descent, in place: ``params[k] -= lr * grads[k]``."""
        if not isinstance(lr, (float, int)) or isinstance(lr, bool) or not (np.isfinite(lr) and lr > 0):
            raise ValueError(f"NumpyMLP.step: lr must be a positive finite number, got {lr!r}")
        if not isinstance(grads, Mapping) or set(grads) != set(self.params):
            got = sorted(grads) if isinstance(grads, Mapping) else type(grads).__name__
            raise ValueError(f"NumpyMLP.step: grads must have the keys {list(self.params)}, got {got}")
        for key, p in self.params.items():
            g = np.asarray(grads[key])
            if g.shape != p.shape:
                raise ValueError(f"NumpyMLP.step: grads[{key!r}] must have shape {p.shape}, got {g.shape}")
            if not np.isfinite(g).all():
                raise ValueError(f"NumpyMLP.step: grads[{key!r}] contains NaN or infinite values")
        for key, p in self.params.items():
            p -= lr * np.asarray(grads[key], dtype=np.float64)

    # training ---------------------------------------------------------------------------------------------
    def fit(
        self,
        X: np.ndarray,
        y: np.ndarray,
        *,
        epochs: int,
        batch_size: int = 32,
        lr: float = 0.1,
        seed: int = 0,
        X_val: np.ndarray | None = None,
        y_val: np.ndarray | None = None,
    ) -> dict[str, list[float]]:
        """Minibatch SGD on ``(X, y)``, reshuffled every epoch with ``mmbook.numpy_rng(seed)``.

        Returns a history shaped like :func:`mmbook.train.fit`'s: ``"epoch"``, ``"train_loss"`` (mean over the
        epoch's batches, weighted by batch size) and, with validation data, ``"val_loss"`` and ``"val_acc"``.
        """
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"NumpyMLP.fit: epochs must be a positive int, got {epochs!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"NumpyMLP.fit: batch_size must be a positive int, got {batch_size!r}")
        X = self._check_X(X, "fit")
        if X.shape[0] == 0:
            raise ValueError("NumpyMLP.fit: X must hold at least one example, got shape (0, ...)")
        y = _check_labels(y, X.shape[0], self.layer_sizes[-1], "NumpyMLP.fit")
        if (X_val is None) != (y_val is None):
            raise ValueError("NumpyMLP.fit: pass both X_val and y_val, or neither")
        if X_val is not None:
            X_val = self._check_X(X_val, "fit")
            y_val = _check_labels(y_val, X_val.shape[0], self.layer_sizes[-1], "NumpyMLP.fit")
        rng = numpy_rng(seed)
        history: dict[str, list[Any]] = {"epoch": [], "train_loss": []}
        for epoch in range(1, epochs + 1):
            order = rng.permutation(X.shape[0])
            total = 0.0
            for start in range(0, X.shape[0], batch_size):
                idx = order[start:start + batch_size]
                loss, grads = self.loss_and_grads(X[idx], y[idx])
                self.step(grads, lr)
                total += loss * len(idx)
            history["epoch"].append(epoch)
            history["train_loss"].append(total / X.shape[0])
            if X_val is not None:
                logits = self.forward(X_val)[0]
                history.setdefault("val_loss", []).append(cross_entropy(logits, y_val))
                history.setdefault("val_acc", []).append(float((logits.argmax(axis=1) == y_val).mean()))
        return history

    # interoperability -------------------------------------------------------------------------------------
    def to_torch(self, dtype: Any = None):
        """The same network as a ``torch.nn.Sequential`` of ``Linear`` and activation modules, weights copied.

        ``dtype`` defaults to ``torch.float64``. The module returns logits ``(batch, n_L)``.
        """
        import torch
        from torch import nn

        dtype = torch.float64 if dtype is None else dtype
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"NumpyMLP.to_torch: dtype must be a floating torch.dtype, got {dtype!r}")
        modules: list[nn.Module] = []
        act = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}[self.activation]
        for l in range(1, self.num_layers + 1):
            W, b = self.params[f"W{l}"], self.params[f"b{l}"]
            linear = nn.Linear(W.shape[1], W.shape[0], dtype=dtype)
            with torch.no_grad():
                linear.weight.copy_(torch.from_numpy(W))
                linear.bias.copy_(torch.from_numpy(b))
            modules.append(linear)
            if l < self.num_layers:
                modules.append(act())
        return nn.Sequential(*modules)
