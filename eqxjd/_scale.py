r"""Exact power-of-two rescaling, so that Gramians and norms neither overflow nor
underflow, and the half-precision rule.

A Jacobian $J$ is rescaled to $J / 2^k$ (and a Gramian $G$ to $G / 4^k$) only when the
trace of the Gramian, $\lVert J \rVert_F^2$, lies outside a window $[2^{-W}, 2^W]$;
inside it $k = 0$ and nothing changes, bit for bit. Outside, the trace is brought just
across the window's edge: into $[2^W, 2^{W+2})$ from above, into $[2^{-W-2}, 2^{-W})$
from below. So a comparison `trace < threshold` has the same outcome before and after
the rescaling for every threshold in $[2^{-W+1}, 2^{W-1}]$, rounding included: this
keeps absolute thresholds such as `norm_eps` on the same side.

Two windows are used:

- `wide_window(dtype)` ($W$ = 97 for float32, 964 for float64) guarantees only that
  the Gramian is representable to full precision: it leaves room for sums over its
  rows, and a full mantissa of headroom above the smallest normal number, since XLA
  flushes subnormals to zero. The weighted aggregators form the Gramian of $J / 2^k$
  with it: any Gramian that the dtype holds to full precision is passed unchanged, so
  every threshold and additive constant of a weighting keeps its meaning; only
  Gramians that would overflow or lose precision to underflow are rescaled, to the
  edge of that range, where constants are still negligible (or still dominate)
  exactly as they would at the true scale.
- `NARROW` ($W = 40$) leaves headroom for squares and cubes inside weightings whose
  weights do not change when $G$ is multiplied by a constant (MGDA, AlignedMTL, IMTL-G,
  Krum, PCGrad, NashMTL, ...): they rescale into it before computing.

A weighting handed a rescaled Gramian $G_s = G / 4^k$ computes the weights of $G_s$.
Those are the weights of $G$ for a weighting whose weights are invariant under
$G \to c\, G$. A weighting for which this is not so implements the private method
`_scaled_call(gramian_s, k, [state], *, key)`, which returns what `__call__` would
return on $G_s \cdot 4^k$ (FairGrad corrects by its homogeneity degree, PCD keeps the
exponent in its state, CR-MOGM forwards it).

Half precision: float16 and bfloat16 input is computed as the same values in float32
(`work_dtype`), and the result is cast back.

The helpers that run many small operations are jitted (and inlined under an outer
jit), so that eager calls run one compiled function each.
"""

from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax.lax as lax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray


NARROW = 40


def wide_window(dtype: Any) -> int:
    """The widest window in which a Gramian of this dtype is representable with room
    for sums over its rows, and with a full mantissa of headroom above the smallest
    normal number: XLA flushes subnormals to zero, so a product of two entries that is
    smaller than the trace by more than the precision must still be normal."""
    info = jnp.finfo(dtype)
    return min(int(info.maxexp) - 24, -int(info.minexp) - int(info.nmant) - 6)


def work_dtype(dtype: Any) -> jnp.dtype:
    """float32 for half-precision dtypes, the dtype itself otherwise."""
    dtype = jnp.dtype(dtype)
    if dtype in (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16)):
        return jnp.dtype(jnp.float32)
    return dtype


def promote_half(x: Array) -> Array:
    """`x` in `work_dtype(x.dtype)` (float32 for half precision)."""
    x = jnp.asarray(x)
    return x.astype(work_dtype(x.dtype))


def _pow2(k: Int[Array, ""], dtype: Any) -> Float[Array, ""]:
    # 2^k built from its bits, exact for k in the normal exponent range (clipped to it).
    info = jnp.finfo(dtype)
    bias = int(info.maxexp) - 1
    k = jnp.clip(k, 1 - bias, bias)
    if jnp.dtype(dtype).itemsize == 8:
        bits = (k.astype(jnp.int64) + bias) << int(info.nmant)
    else:
        bits = (k.astype(jnp.int32) + bias) << int(info.nmant)
    return lax.bitcast_convert_type(bits, dtype)


def scale_pow2(x: Array, k: Int[Array, ""]) -> Array:
    """`x * 2**k`, exact whenever the result is a normal number (two factors of the
    same sign, so that `k` may exceed the exponent range of one). `k = 0` returns the
    same values, bit for bit."""
    k = jnp.asarray(k, jnp.int32)
    half = k // 2
    return x * _pow2(half, x.dtype) * _pow2(k - half, x.dtype)


def _exponent(x: Float[Array, ""]) -> Int[Array, ""]:
    """`e` with `2^(e-1) <= x < 2^e` for a finite positive `x`, else `0`."""
    _, e = jnp.frexp(x)
    return jnp.where(jnp.isfinite(x) & (x > 0), e, 0).astype(jnp.int32)


def _shift(e: Int[Array, ""], window: int) -> Int[Array, ""]:
    """The `k` that moves a positive measure in `[2^(e-1), 2^e)`, divided by `4^k`, to
    within the window: `0` inside it, else just across its nearer edge."""
    down = jnp.maximum((e - 1 - window) // 2, 0)
    up = jnp.minimum(-((-(e + window)) // 2), 0)
    return (down + up).astype(jnp.int32)


def _max_abs(arrays: Sequence[Array]) -> Float[Array, ""]:
    return jnp.max(jnp.stack([jnp.max(jnp.abs(a), initial=0.0) for a in arrays]))


@eqx.filter_jit
def jacobian_exponent(
    matrices: Sequence[Float[Array, "m _n"]], window: int
) -> Int[Array, ""]:
    """The `k` such that the Gramian of `[M / 2^k for M in matrices]` (summed) has its
    trace within the window; `0` when it already has, or when an entry is not finite
    or every entry is zero. Computed without forming the Gramian."""
    matrices = [lax.stop_gradient(m) for m in matrices]
    top = _max_abs(matrices)
    e_top = _exponent(top)
    # With the largest entry in [1/2, 1) the sum of squares cannot overflow.
    total = jnp.sum(
        jnp.stack([jnp.sum(jnp.square(scale_pow2(m, -e_top))) for m in matrices])
    )
    e = 2 * e_top + _exponent(total)
    valid = jnp.isfinite(top) & (top > 0)
    return jnp.where(valid, _shift(e, window), 0)


def gramian_exponent(gramian: Float[Array, "m m"], window: int) -> Int[Array, ""]:
    r"""The `k` such that `gramian / 4^k` is within the window, measured by
    $\max(\sum_i |G_{ii}|, \max_{ij} |G_{ij}|)$ (the trace for a Gramian; also sound
    for the cross-batch matrices of MoDo and SDMGrad)."""
    g = lax.stop_gradient(gramian)
    top = _max_abs([g])
    e_top = _exponent(top)
    scaled = scale_pow2(g, -e_top)
    measure = jnp.maximum(
        jnp.sum(jnp.abs(jnp.diagonal(scaled))), jnp.max(jnp.abs(scaled), initial=0.0)
    )
    e = e_top + _exponent(measure)
    valid = jnp.isfinite(top) & (top > 0)
    return jnp.where(valid, _shift(e, window), 0)


@eqx.filter_jit
def to_window(
    gramian: Float[Array, "m m"], window: int = NARROW
) -> tuple[Float[Array, "m m"], Int[Array, ""]]:
    """`(gramian / 4^k, k)`, with `k = 0` (and the same values) inside the window."""
    k = gramian_exponent(gramian, window)
    return scale_pow2(gramian, -2 * k), k


def in_window(
    gramian: Float[Array, "m m"], window: int = NARROW
) -> Float[Array, "m m"]:
    """`gramian / 4^k` within the window, for weightings whose weights do not change
    when the Gramian is multiplied by a constant."""
    return to_window(gramian, window)[0]


def _vector_exponent(
    x: Float[Array, "..."], window: int, floor: Any = 0.0
) -> Int[Array, ""]:
    # The k such that max(max|x|, floor) / 2^k is within [2^-window, 2^window] (0
    # inside it).
    top = jnp.max(jnp.abs(lax.stop_gradient(x)), initial=0.0)
    top = jnp.maximum(top, jnp.asarray(floor, top.dtype))
    e = _exponent(top)
    k = jnp.maximum(e - 1 - window, 0) + jnp.minimum(e + window, 0)
    valid = jnp.isfinite(top) & (top > 0)
    return jnp.where(valid, k, 0)


def vector_in_window(x: Float[Array, " m"], window: int) -> Float[Array, " m"]:
    """`x / 2^k` with its largest magnitude within `[2^-window, 2^window]` (`k = 0`,
    and the same values, inside it), for quantities that matter only up to a common
    factor."""
    return scale_pow2(x, -_vector_exponent(x, window))


def root_sum_squares(x: Float[Array, "..."], plus: Any = 0.0) -> Float[Array, ""]:
    """`sqrt(sum(x * x) + plus)` without overflow or underflow of the squares: `x` is
    rescaled by a power of 2 only when the result's scale, `max(max|x|, sqrt(plus))`,
    is outside `2^±20` (then `plus` is rescaled too), so ordinary input gives the same
    values."""
    plus = jnp.asarray(plus, x.dtype)
    k = _vector_exponent(x, NARROW // 2, jnp.sqrt(lax.stop_gradient(plus)))
    scaled = scale_pow2(x, -k)
    plus = scale_pow2(plus, -2 * k)
    return scale_pow2(jnp.sqrt(jnp.sum(scaled * scaled) + plus), k)


def exponent_of_pair(
    values: Float[Array, " m"], exponent: Int[Array, ""], window: int
) -> tuple[Float[Array, " m"], Int[Array, ""]]:
    """`values * 4^exponent` written again as `(values', exponent')`, with
    `exponent' = 0` whenever the largest value is within the window (else just across
    its edge): a representation for state that may leave the dtype's range."""
    top = jnp.max(jnp.abs(lax.stop_gradient(values)), initial=0.0)
    valid = jnp.isfinite(top) & (top > 0)
    new = jnp.where(valid, _shift(_exponent(top) + 2 * exponent, window), 0)
    return scale_pow2(values, 2 * (exponent - new)), new


@eqx.filter_jit
def scaled_gramian(
    matrices: Sequence[Float[Array, "m _n"]], gram: Any
) -> tuple[Float[Array, "m m"], Int[Array, ""]]:
    """`(sum of gram(M / 2^k), k)`: the Gramian of a Jacobian given by its blocks of
    columns, rescaled only when it would not be representable (`wide_window`)."""
    dtype = jnp.result_type(*matrices)
    k = jacobian_exponent(matrices, wide_window(dtype))
    m = matrices[0].shape[0]
    total = jnp.zeros((m, m), dtype)
    for matrix in matrices:
        total = total + gram(scale_pow2(matrix.astype(dtype), -k))
    return total, k


def call_scaled(
    weighting: Any,
    stat: Array,
    k: Int[Array, ""] | None,
    *state: Any,
    key: PRNGKeyArray | None,
) -> Any:
    """`weighting` on the statistic `stat * 4^k` (a rescaled Gramian; `k = None`: an
    unscaled statistic). See the module docstring for the protocol."""
    if k is not None:
        hook = getattr(weighting, "_scaled_call", None)
        if hook is not None:
            return hook(stat, k, *state, key=key)
    return weighting(stat, *state, key=key)
