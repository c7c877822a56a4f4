from typing import overload

import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, ArrayLike, Bool, Float

from ._checks import check_length, check_real
from ._custom_types import ScalarLike, State
from ._scale import in_window, work_dtype


_HIGHEST = lax.Precision.HIGHEST


@overload
def as_vector(value: None, name: str) -> None: ...
@overload
def as_vector(value: ArrayLike, name: str) -> Float[Array, " k"]: ...
def as_vector(value: ArrayLike | None, name: str) -> Float[Array, " k"] | None:
    """Converter for optional 1-D hyperparameters such as `pref_vector`."""
    if value is None:
        return None
    array = jnp.asarray(value)
    if array.ndim != 1:
        raise ValueError(f"`{name}` must be a 1-D vector; got shape {array.shape}.")
    check_real(array, name)
    if not jnp.issubdtype(array.dtype, jnp.inexact):
        array = array.astype(jnp.result_type(float))
    return array


def gramian(matrix: Float[Array, "m n"]) -> Float[Array, "m m"]:
    r"""The Gramian $G = J J^\top$, always at full matmul precision."""
    return jnp.matmul(matrix, matrix.T, precision=_HIGHEST)


def combine(
    weights: Float[Array, " m"], matrix: Float[Array, "m n"]
) -> Float[Array, " n"]:
    r"""The aggregation $d = w^\top J$ at full matmul precision."""
    return jnp.tensordot(weights, matrix, axes=1, precision=_HIGHEST)


def normalize(gramian: Float[Array, "m m"], eps: ScalarLike) -> Float[Array, "m m"]:
    """`G / tr(G)`, or zero if `tr(G) < eps` (TorchJD's absolute threshold).

    The threshold is compared with the trace of `G` itself, so it keeps its meaning for
    any representable `G`; the division is done on `G` rescaled by a power of 4 (exact,
    and the identity for ordinary Gramians), so that a trace that overflows or
    underflows does not turn the result into NaN or zero."""
    small = jnp.trace(gramian) < eps
    scaled = in_window(gramian)
    trace = jnp.trace(scaled)
    safe_trace = jnp.where(small, jnp.ones_like(trace), trace)
    return jnp.where(small, jnp.zeros_like(scaled), scaled / safe_trace)


def regularize(gramian: Float[Array, "m m"], eps: ScalarLike) -> Float[Array, "m m"]:
    """`G + eps * I`."""
    return gramian + eps * jnp.eye(gramian.shape[0], dtype=gramian.dtype)


def pref_weights(
    pref_vector: Float[Array, " k"] | None, m: int, dtype: jnp.dtype
) -> Float[Array, " m"]:
    """The preference weights: `1/m` each when `pref_vector` is None."""
    if pref_vector is None:
        return jnp.full((m,), 1 / max(m, 1), dtype=dtype)
    check_length(pref_vector, m, "pref_vector")
    return pref_vector.astype(dtype)


def all_finite(x: Array) -> Array:
    return jnp.all(jnp.isfinite(x))


def nan_unless_finite(check: Array, out: Array) -> Array:
    """Documented NaN policy: non-finite input gives an all-NaN output."""
    return jnp.where(all_finite(check), out, jnp.full_like(out, jnp.nan))


def keep_state_unless(finite: Bool[Array, ""], new: State, old: State) -> State:
    """Documented state policy: a call on non-finite input leaves the state as it was
    (`new` where `finite`, else `old`; both with the same structure and dtypes)."""
    return jtu.tree_map(lambda n, o: jnp.where(finite, n, o), new, old)


def solve_dtype(dtype: jnp.dtype) -> jnp.dtype:
    """QPs are solved in float64 whenever x64 is enabled, as TorchJD does; otherwise in
    float32 (half precision included)."""
    if jax.config.read("jax_enable_x64"):
        return jnp.dtype(jnp.float64)
    return work_dtype(dtype)


def project_onto_simplex(y: Float[Array, " m"]) -> Float[Array, " m"]:
    r"""Euclidean projection onto $\{w \geq 0, \sum w = 1\}$, tie-for-tie as TorchJD.

    With $s$ = `y` sorted in decreasing order and
    $c_i = (\sum_{k \le i} s_k - 1)/(i+1)$, $\tau = c_i$ at the first $i$ with
    $c_i > s_{i+1}$ (else $(\sum y - 1)/m$), and the result is $\max(y - \tau, 0)$.
    """
    m = y.shape[0]
    if m <= 1:
        return jnp.ones_like(y)
    s = jnp.sort(y)[::-1]
    c = (jnp.cumsum(s) - 1) / jnp.arange(1, m + 1, dtype=y.dtype)
    hit = c[:-1] > s[1:]
    first = jnp.argmax(hit)
    tau = jnp.where(jnp.any(hit), c[first], (jnp.sum(y) - 1) / m)
    return jnp.maximum(y - tau, 0)


def pinv(matrix: Float[Array, "a b"]) -> Float[Array, "b a"]:
    """Pseudo-inverse with TorchJD's cutoff: `max(a, b) * eps` relative to sigma_max."""
    rtol = max(matrix.shape) * jnp.finfo(matrix.dtype).eps
    return jnp.linalg.pinv(matrix, rtol=rtol)


def lower_median(x: Float[Array, " k"]) -> Float[Array, ""]:
    """torch.median's convention: element (k - 1) // 2 of the ascending order."""
    return jnp.sort(x)[(x.shape[0] - 1) // 2]
