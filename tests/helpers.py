"""Shared test utilities: Jacobian builders (seeded by keys), reference data, checks."""

import pathlib

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from eqxjd._aggregation.gradvac import gradvac_weights


REFERENCE = pathlib.Path(__file__).parent / "reference"


def x64_enabled() -> bool:
    return bool(jax.config.read("jax_enable_x64"))


# The widest float of the mode the tests run in: float64, or float32 when
# `EQXJD_TEST_X64=0` (see conftest.py).
FLOAT = jnp.dtype(jnp.float64) if x64_enabled() else jnp.dtype(jnp.float32)
requires_x64 = pytest.mark.skipif(
    not x64_enabled(), reason="needs float64 (run without EQXJD_TEST_X64=0)"
)


def load_reference(name: str) -> dict[str, np.ndarray]:
    """Loads `tests/reference/<name>.npz` merged with its `<name>_large.npz` companion
    (TorchJD 0.18.0 values; see generate.py and tests/reference/README.md)."""
    out = {}
    for path in (REFERENCE / f"{name}.npz", REFERENCE / f"{name}_large.npz"):
        if path.exists():
            with np.load(path) as data:
                out.update(data)
    return out


def reference_names(data: dict[str, np.ndarray], method: str) -> list[str]:
    """The input names that have outputs for `method` in a reference file."""
    prefix = f"{method}/"
    return sorted({k.split("/")[1] for k in data if k.startswith(prefix)})


def tree_allclose(x, y, *, rtol=1e-5, atol=1e-8):
    return eqx.tree_equal(x, y, typematch=True, rtol=rtol, atol=atol)


def rel_err(x, y) -> float:
    x, y = np.asarray(x), np.asarray(y)
    scale = max(np.max(np.abs(y), initial=0.0), 1e-300)
    return float(np.max(np.abs(x - y), initial=0.0) / scale)


def finite_difference_jvp(fn, primals, tangents, eps=1e-6):
    """Central finite difference of `fn` at `primals` along `tangents` (float64)."""
    plus = fn(*[p + eps * t for p, t in zip(primals, tangents)])
    minus = fn(*[p - eps * t for p, t in zip(primals, tangents)])
    return (plus - minus) / (2 * eps)


def gaussian(key, m, n, dtype=None):
    return jr.normal(key, (m, n), FLOAT if dtype is None else dtype)


def low_rank(key, m, n, rank, noise=1e-3, spread=1.0, dtype=None):
    """Rank-`rank` Jacobian plus `noise` Gaussian noise, row norms spread over
    `1..spread`: the ill-conditioned kind where fixed-step solvers fail."""
    dtype = FLOAT if dtype is None else dtype
    k1, k2, k3 = jr.split(key, 3)
    base = jr.normal(k1, (m, rank), dtype) @ jr.normal(k2, (rank, n), dtype)
    out = base + noise * jr.normal(k3, (m, n), dtype)
    return out * jnp.logspace(0, jnp.log10(spread), m, dtype=dtype)[:, None]


def conflicting(key, m, n, dtype=None):
    """Nearly collinear rows with random signs: strong conflicts."""
    dtype = FLOAT if dtype is None else dtype
    k1, k2, k3 = jr.split(key, 3)
    direction = jr.normal(k1, (n,), dtype)
    signs = jnp.where(jr.bernoulli(k2, 0.5, (m,)), 1.0, -1.0).astype(dtype)
    return signs[:, None] * direction[None, :] + 0.05 * jr.normal(k3, (m, n), dtype)


def strongly_stationary(key, m, n, rank, dtype=None):
    """A Jacobian with v^T J = 0 for some v > 0 (TorchJD's `Strong` sampler)."""
    dtype = FLOAT if dtype is None else dtype
    k1, k2, k3, k4 = jr.split(key, 4)
    v = jnp.abs(jr.normal(k1, (m,), dtype)) + 0.1
    v = v / jnp.linalg.norm(v)
    q, _ = jnp.linalg.qr(
        jnp.concatenate([v[:, None], jr.normal(k2, (m, m - 1), dtype)], 1)
    )
    complement = q[:, 1 : rank + 1]
    right, _ = jnp.linalg.qr(jr.normal(k3, (n, rank), dtype))
    singular = jnp.abs(jr.normal(k4, (rank,), dtype)) + 0.1
    return complement @ jnp.diag(singular) @ right.T


def jacobian_kinds(key, dtype=None):
    """A small dict of named test Jacobians covering the hard kinds (m, n <= 12)."""
    dtype = FLOAT if dtype is None else dtype
    keys = jr.split(key, 8)
    return {
        "gaussian": gaussian(keys[0], 5, 7, dtype),
        "wide": gaussian(keys[1], 3, 12, dtype),
        "tall": gaussian(keys[2], 9, 4, dtype),
        "low_rank": low_rank(keys[3], 8, 10, 2, dtype=dtype),
        "low_rank_spread": low_rank(keys[4], 8, 10, 3, spread=100.0, dtype=dtype),
        "conflicting": conflicting(keys[5], 6, 5, dtype),
        "stationary": strongly_stationary(keys[6], 6, 8, 3, dtype),
        "single": gaussian(keys[7], 1, 4, dtype),
        "zero": jnp.zeros((4, 3), dtype),
    }


def mode_tol(x64: float, f32: float = 1e-4) -> float:
    """A tolerance for the mode the tests run in (float32 when x64 is off)."""
    return x64 if x64_enabled() else f32


# The dtypes a test can create: both, or float32 only when x64 is off.
DTYPES = (jnp.float64, jnp.float32) if x64_enabled() else (jnp.float32,)


def pad(x, shape, value=0.0):
    x = np.asarray(x)
    return np.pad(
        x, [(0, t - s) for s, t in zip(x.shape, shape)], constant_values=value
    )


def small_kinds():
    """Degenerate and hard Jacobians (helpers.jacobian_kinds minus a few shapes, to
    limit compilations; its `conflicting` builder trips rank_promotion='raise')."""
    keys = jr.split(jr.key(0), 4)
    direction = jr.normal(keys[2], (5,))
    signs = jnp.array([1.0, -1.0, 1.0, -1.0, -1.0, 1.0])
    return {
        "gaussian": gaussian(keys[0], 5, 7),
        "low_rank": low_rank(keys[1], 8, 10, 2, spread=100.0),
        "conflicting": signs[:, None] * direction[None, :]
        + 0.05 * jr.normal(keys[3], (6, 5)),
        "stationary": strongly_stationary(keys[3], 6, 8, 3),
        "single": gaussian(keys[0], 1, 3),
        "zero": jnp.zeros((5, 7)),
    }


@eqx.filter_jit
def outputs(agg, J, key):
    return agg.weights(J, key=key), agg(J, key=key)


def cagrad_objective(G, w, c):
    m = G.shape[0]
    tr = np.trace(G)
    Gn = G / tr if tr >= 1e-4 else 0 * G
    b = Gn @ np.full(m, 1 / m)
    s = c * np.sqrt(max(Gn.sum(), 0)) / m
    return b @ w + s * np.sqrt(max(w @ Gn @ w, 0))


def cagrad_star(weights):
    """Recovers w* in the simplex from weights = 1/m + (s / ||R^T w*||) w*."""
    m = len(weights)
    return (weights - 1 / m) / (weights.sum() - 1)


# Number of columns every m x n Jacobian is zero-padded to (one compilation per m;
# zero columns leave G, hence the weights, unchanged).
NASH_N = {1: 4, 2: 27, 3: 12, 4: 3, 5: 7, 6: 8, 8: 100, 9: 11}


@eqx.filter_jit
def nash_step(agg, J, state):
    return agg.weights(J, state)


def nash_weights(agg, J, state):
    """Weights and new state of `agg` on J (padded to NASH_N columns)."""
    J = np.asarray(J)
    return nash_step(agg, jnp.asarray(pad(J, (J.shape[0], NASH_N[J.shape[0]]))), state)


def arrays(module):
    """Float hyperparameters as 0-d arrays, so that `eqx.filter_jit` traces them
    (different configurations then share one compilation)."""
    return jax.tree_util.tree_map(
        lambda x: jnp.asarray(x, jnp.float64) if isinstance(x, float) else x, module
    )


@eqx.filter_jit
def step(method, stat, state, key=None):
    return method(stat, state, key=key)


@eqx.filter_jit
def weights_step(aggregator, jacobian, state, key=None):
    return aggregator.weights(jacobian, state, key=key)


gradvac_core = jax.jit(gradvac_weights)


@eqx.filter_jit
def call(method, stat, key=None):
    return method(stat, key=key)


def run_sequence(method, stats, *, weights=False, key=None):
    """Calls a stateful method on each stat, threading the state; returns outputs."""
    method = arrays(method)
    state = method.init(jnp.asarray(stats[0]))
    outs = []
    for k, stat in enumerate(stats):
        fn = weights_step if weights else step
        out, state = fn(
            method, jnp.asarray(stat), state, None if key is None else jr.key(k)
        )
        outs.append(np.asarray(out))
    return outs, state


# The sequences fed to the stateful methods (3 calls each), and TorchJD 0.18.0's
# weights on them (float64), one row per call: tests/reference/modern_sequences.npz,
# written by tests/reference/generate.py (part `modern_sequences`).
SEQS = {
    "s5": [
        np.random.RandomState(0).randn(5, 7),
        np.random.RandomState(1).randn(5, 7),
        np.random.RandomState(2).randn(5, 7),
    ],
    "s2": [
        np.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]),
        np.random.RandomState(3).randn(2, 3),
        np.random.RandomState(4).randn(2, 3),
    ],
}
SEQ_REF = load_reference("modern_sequences")


def cross(seq):
    """The cross-batch matrices J1 J2^T given to MoDo and SDMGrad."""
    return [seq[0] @ seq[1].T, seq[1] @ seq[2].T, seq[2] @ seq[0].T]


def rel(x, y):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return float(np.max(np.abs(x - y)) / max(np.max(np.abs(y)), 1e-300))
