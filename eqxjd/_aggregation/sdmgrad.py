import functools as ft
from typing import ClassVar

import equinox as eqx
import jax.lax as lax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .._checks import (
    check_gramian,
    check_length,
    check_range,
    check_scalar,
    check_state_shape,
    require_state,
    WEIGHTING_USAGE,
)
from .._custom_types import ScalarLike, State
from .._misc import all_finite, as_vector, keep_state_unless, project_onto_simplex
from .._scale import in_window, promote_half, wide_window, work_dtype
from .._weighting import AbstractStatefulWeighting, Reads


_HIGHEST = lax.Precision.HIGHEST


class _SDMGradState(eqx.Module):
    weights: Float[Array, " m"]


# Jitted (inlined under an outer jit) so that eager calls do not re-trace and
# re-compile the loop on every call.
@eqx.filter_jit
def _projected_sgd(
    a: Float[Array, "m m"],
    w: Float[Array, " m"],
    shift: Float[Array, " m"],
    lr: Float[Array, ""],
    momentum: Float[Array, ""],
    n_iter: int,
) -> Float[Array, " m"]:
    """`n_iter` steps of `v <- momentum v + a (w + shift)`, `w <- proj(w - lr v)`."""

    def body(_, carry):
        w, velocity = carry
        grad = jnp.matmul(a, w + shift, precision=_HIGHEST)
        velocity = momentum * velocity + grad
        return project_onto_simplex(w - lr * velocity), velocity

    w, _ = lax.fori_loop(0, n_iter, body, (w, jnp.zeros_like(w)))
    return w


class SDMGradWeighting(AbstractStatefulWeighting):
    r"""The task weights of SDMGrad (Stochastic Direction-oriented Multi-objective
    Gradient descent).

    The input is the **cross-batch** matrix $A = J_1 J_2^\top$ of two Jacobians computed
    on two independent mini-batches (build it with `J1 @ J2.T`). With $\tilde w$ the
    preference (default $1/m$) and $\hat A = A / (\sigma^2 + 10^{-8})$,
    $\sigma = \operatorname{mean}_i \sqrt{\max(A_{ii}, 0)}$, each call runs `n_iter`
    steps of projected SGD with momentum from the stored $w$ ($1/m$ initially):

    $$v \leftarrow \mu v + \hat A(w + \lambda\tilde w),\qquad
    w \leftarrow \Pi_\Delta(w - \eta\, v),$$

    stores $w$ and returns $(w + \lambda\tilde w)/(1 + \lambda)$. Typical step (three
    batches): `weights, state = sdmgrad(J1 @ J2.T, state)`, then `weights @ J3`.
    Stateful ($w$), not differentiable, no aggregator class (as TorchJD). Non-finite
    input gives NaN weights and leaves the state unchanged.

    Xiao et al., *Direction-oriented Multi-objective Learning: Simple and Provable
    Stochastic Algorithms*, NeurIPS 2023,
    [arXiv:2305.18409](https://arxiv.org/abs/2305.18409).
    """

    reads: ClassVar[Reads] = "gramian"

    lr: ScalarLike = 10.0
    momentum: ScalarLike = 0.5
    n_iter: int = eqx.field(default=20, static=True)
    lambda_: ScalarLike = 0.3
    pref_vector: Float[Array, " m"] | None = eqx.field(
        default=None, converter=ft.partial(as_vector, name="pref_vector")
    )

    differentiable: ClassVar[bool] = False

    def __check_init__(self):
        for name in ("lr", "momentum", "lambda_"):
            check_scalar(getattr(self, name), name)
        check_range(self.lr, "lr", 0.0, low_open=True)
        check_range(self.momentum, "momentum", 0.0, 1.0, high_open=True)
        check_range(self.lambda_, "lambda_", 0.0)
        if not isinstance(self.n_iter, int) or self.n_iter < 1:
            raise ValueError(
                f"`n_iter` must be a positive integer; got n_iter={self.n_iter!r}."
            )

    def init(self, matrix: Float[Array, "m m"], /) -> State:
        matrix = check_gramian(matrix)
        m = matrix.shape[0]
        return _SDMGradState(jnp.full((m,), 1 / max(m, 1), work_dtype(matrix.dtype)))

    def __call__(
        self,
        matrix: Float[Array, "m m"],
        state: State = None,
        /,
        *,
        key: PRNGKeyArray | None = None,
    ) -> tuple[Float[Array, " m"], State]:
        require_state(state, "SDMGradWeighting", WEIGHTING_USAGE)
        matrix = check_gramian(matrix)
        m = matrix.shape[0]
        check_state_shape(state.weights.shape, (m,), "SDMGrad")
        out_dtype = matrix.dtype
        # Rescaled (by a power of 4) only if its entries are too large or too small
        # for sums of them: A / (sigma^2 + 1e-8) is then the same up to rounding.
        work = promote_half(matrix)
        work = in_window(work, wide_window(work.dtype))
        dtype = work.dtype
        if self.pref_vector is None:
            w_tilde = jnp.full((m,), 1 / max(m, 1), dtype)
        else:
            check_length(self.pref_vector, m, "pref_vector")
            w_tilde = self.pref_vector.astype(dtype)
        lam = jnp.asarray(self.lambda_, dtype)
        lr = jnp.asarray(self.lr, dtype)
        momentum = jnp.asarray(self.momentum, dtype)
        diag = jnp.maximum(jnp.diagonal(work), 0)
        scale = jnp.mean(jnp.sqrt(diag)) if m > 0 else jnp.zeros((), dtype)
        a = work / (scale**2 + 1e-8)

        w0 = state.weights.astype(dtype)
        w = _projected_sgd(a, w0, lam * w_tilde, lr, momentum, self.n_iter)
        w = lax.stop_gradient(w)
        out = lax.stop_gradient((w + lam * w_tilde) / (1 + lam))
        finite = all_finite(work)
        new_state = _SDMGradState(w.astype(state.weights.dtype))
        new_state = keep_state_unless(finite, new_state, state)
        return jnp.where(finite, out, jnp.nan).astype(out_dtype), new_state


SDMGradWeighting.__init__.__doc__ = """**Arguments:**

- `lr`: learning rate $\\eta > 0$ of the inner projected SGD. Default `10.0`.
- `momentum`: momentum $\\mu \\in [0, 1)$ of the inner SGD. Default `0.5`.
- `n_iter`: number of inner iterations per call, a positive integer. Default `20`.
- `lambda_`: non-negative pull $\\lambda$ towards the preference direction. Default
    `0.3` (the value of the paper's experiments and LibMTL; the official class
    default is `0.6`).
- `pref_vector`: the preference $\\tilde w$, a 1-D array of shape `(m,)` (checked at
    call time); `None` (default) means $1/m$ each.
"""
