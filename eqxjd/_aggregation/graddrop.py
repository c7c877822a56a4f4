import functools as ft
from collections.abc import Callable

import equinox as eqx
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, PRNGKeyArray

from .._aggregator import AbstractAggregator
from .._checks import check_length, check_matrix, require_key
from .._misc import as_vector
from .._scale import promote_half, work_dtype


def _identity(purity: Float[Array, " n"]) -> Float[Array, " n"]:
    return purity


def graddrop_uniforms(
    key: PRNGKeyArray, n: int, dtype: jnp.dtype
) -> Float[Array, " n"]:
    """The draws of [`eqxjd.GradDrop`][]: $U \\sim \\mathcal U[0, 1)^n$ (one per
    column, shared by all rows)."""
    return jr.uniform(key, (n,), dtype)


def graddrop(
    jacobian: Float[Array, "m n"],
    uniforms: Float[Array, " n"],
    f: Callable[[Float[Array, " n"]], Float[Array, " n"]] = _identity,
    leak: Float[Array, " m"] | None = None,
) -> Float[Array, " n"]:
    """The deterministic core of [`eqxjd.GradDrop`][] with the uniforms given.

    With TorchJD's draws (`torch.rand(n, dtype=J.dtype)` after `torch.manual_seed(0)`)
    it reproduces TorchJD's output. Not differentiable (the caller stops gradients).
    """
    jacobian = check_matrix(jacobian)
    m, n = jacobian.shape
    if leak is not None:
        check_length(leak, m, "leak")
    dtype = jacobian.dtype
    if m == 0 or n == 0:
        return jnp.zeros((n,), dtype)
    jacobian = promote_half(jacobian)
    work = jacobian.dtype
    leak = jnp.zeros((m,), work) if leak is None else leak.astype(work)
    one = jnp.ones((), work)
    # Gradient positive sign purity; an all-zero column gives NaN, then every
    # comparison below is False and the column contributes 0 (as TorchJD).
    purity = 0.5 * (
        one + jnp.sum(jacobian, axis=0) / jnp.sum(jnp.abs(jacobian), axis=0)
    )
    f_purity = jnp.asarray(f(purity)).astype(work)
    uniforms = jnp.asarray(uniforms).astype(work)
    above = (f_purity > uniforms)[None, :]
    below = (f_purity < uniforms)[None, :]
    keep = (above & (jacobian > 0)) | (below & (jacobian < 0))
    mask = leak[:, None] + (one - leak[:, None]) * keep.astype(work)
    out = jnp.sum(mask * jacobian, axis=0)
    # A column with a non-finite entry gives NaN, eagerly and under jit alike (XLA may
    # turn `0 * nan` from a dropped entry into 0).
    finite = jnp.all(jnp.isfinite(jacobian), axis=0)
    return jnp.where(finite, out, jnp.nan).astype(dtype)


class GradDrop(AbstractAggregator):
    r"""Gradient Sign Dropout.

    For each coordinate $k$, the positive sign purity
    $P_k = \tfrac12\big(1 + \sum_i J_{ik} / \sum_i |J_{ik}|\big)$ is compared with one
    uniform draw $U_k \sim \mathcal U[0, 1)$ (shared by all rows): row $i$ keeps its
    entry $J_{ik}$ if $f(P_k) > U_k$ and $J_{ik} > 0$, or $f(P_k) < U_k$ and
    $J_{ik} < 0$; dropped entries still leak through with weight $\ell_i$:

    $$A(J)_k = \sum_i \big(\ell_i + (1 - \ell_i) M_{ik}\big) J_{ik}.$$

    Not differentiable (gradients through the output are zero). `key` is required.
    An all-zero column gives $0$; a column with a NaN or infinite entry gives NaN (the
    other coordinates are unaffected); `m = 0` or `n = 0` gives `zeros(n)`. Positively
    homogeneous: $A(cJ) = c\,A(J)$ for $c > 0$ with the same key.

    Chen et al., *Just Pick a Sign: Optimizing Deep Multitask Models with Gradient Sign
    Dropout*, NeurIPS 2020, [arXiv:2010.06808](https://arxiv.org/abs/2010.06808),
    Algorithm 1, lines 10 to 15.
    """

    f: Callable[[Float[Array, " n"]], Float[Array, " n"]] = _identity
    leak: Float[Array, " m"] | None = eqx.field(
        default=None, converter=ft.partial(as_vector, name="leak")
    )

    def __call__(
        self, jacobian: Float[Array, "m n"], /, *, key: PRNGKeyArray | None = None
    ) -> Float[Array, " n"]:
        jacobian = check_matrix(jacobian)
        if self.leak is not None:
            check_length(self.leak, jacobian.shape[0], "leak")
        key = require_key(key, "GradDrop")
        # Half precision runs in float32, draws included.
        uniforms = graddrop_uniforms(key, jacobian.shape[1], work_dtype(jacobian.dtype))
        out = graddrop(jacobian, uniforms, self.f, self.leak)
        return lax.stop_gradient(out)


GradDrop.__init__.__doc__ = """**Arguments:**

- `f`: a monotonically increasing function applied elementwise to the sign purity
    $P \\in [0, 1]^n$ (not checked). Default: the identity. A plain Python function or
    an `equinox.Module`; under `eqx.filter_jit` a function is hashed by identity, so
    define it once rather than passing a new lambda at every call.
- `leak`: the leak $\\ell$, a 1-D array of shape `(m,)` (one value per objective;
    checked against the number of rows at call time). Default `None`, meaning no leak.
"""
