"""Shared test utilities: Jacobian builders (seeded by keys), reference data, checks."""

import pathlib

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest


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
