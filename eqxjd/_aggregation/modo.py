from typing import ClassVar

import equinox as eqx
import jax.lax as lax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .._checks import (
    check_gramian,
    check_range,
    check_scalar,
    check_state_shape,
    require_state,
    WEIGHTING_USAGE,
)
from .._custom_types import ScalarLike, State
from .._misc import all_finite, keep_state_unless, project_onto_simplex
from .._scale import in_window, promote_half, wide_window, work_dtype
from .._weighting import AbstractStatefulWeighting, Reads


_HIGHEST = lax.Precision.HIGHEST


class _MoDoState(eqx.Module):
    weights: Float[Array, " m"]


class MoDoWeighting(AbstractStatefulWeighting):
    r"""The task-weight update of MoDo (Multi-Objective gradient with Double sampling).

    The input is the **cross-batch** matrix $M = J_1 J_2^\top$ of two Jacobians computed
    on two independent mini-batches (not symmetric, not PSD; build it with
    `J1 @ J2.T`).
    Each call performs one projected gradient step on $\lambda$:

    $$\lambda \leftarrow \Pi_\Delta\big(\lambda - \gamma\,(M\lambda + \rho\lambda)\big),
    \qquad \lambda_0 = \tfrac1m\mathbf 1,$$

    and returns $\lambda$ ($\Pi_\Delta$ the Euclidean projection onto the simplex).
    Using a single-batch Gramian $J J^\top$ runs, but breaks the method's guarantee.

    Typical step (two batches): `weights, state = modo(J1 @ J2.T, state)`, then the
    update is `weights @ (J1 + J2) / 2` (three batches: `weights @ J3`). Stateful
    ($\lambda$), not differentiable, no aggregator class (as TorchJD). Non-finite
    input gives NaN weights and leaves the state unchanged.

    Chen et al., *Three-Way Trade-Off in Multi-Objective Learning: Optimization,
    Generalization and Conflict-Avoidance*, JMLR 2024,
    [arXiv:2305.20057](https://arxiv.org/abs/2305.20057).
    """

    reads: ClassVar[Reads] = "gramian"

    gamma: ScalarLike = 0.1
    rho: ScalarLike = 0.1

    differentiable: ClassVar[bool] = False

    def __check_init__(self):
        check_scalar(self.gamma, "gamma")
        check_scalar(self.rho, "rho")
        check_range(self.gamma, "gamma", 0.0, low_open=True)
        check_range(self.rho, "rho", 0.0)

    def init(self, matrix: Float[Array, "m m"], /) -> State:
        matrix = check_gramian(matrix)
        m = matrix.shape[0]
        return _MoDoState(jnp.full((m,), 1 / max(m, 1), work_dtype(matrix.dtype)))

    def __call__(
        self,
        matrix: Float[Array, "m m"],
        state: State = None,
        /,
        *,
        key: PRNGKeyArray | None = None,
    ) -> tuple[Float[Array, " m"], State]:
        require_state(state, "MoDoWeighting", WEIGHTING_USAGE)
        matrix = check_gramian(matrix)
        m = matrix.shape[0]
        check_state_shape(state.weights.shape, (m,), "MoDo")
        dtype = matrix.dtype
        work = promote_half(matrix)
        # Rescaled (by a power of 4) only if its entries are too large or too small
        # for sums of them; the step is then dominated by, or blind to, M as it is at
        # the true scale.
        work = in_window(work, wide_window(work.dtype))
        lam = state.weights.astype(work.dtype)
        grad = (
            jnp.matmul(work, lam, precision=_HIGHEST)
            + jnp.asarray(self.rho, work.dtype) * lam
        )
        lam = project_onto_simplex(lam - jnp.asarray(self.gamma, work.dtype) * grad)
        lam = lax.stop_gradient(lam)
        finite = all_finite(work)
        new_state = _MoDoState(lam.astype(state.weights.dtype))
        new_state = keep_state_unless(finite, new_state, state)
        return jnp.where(finite, lam, jnp.nan).astype(dtype), new_state


MoDoWeighting.__init__.__doc__ = """**Arguments:**

- `gamma`: learning rate $\\gamma > 0$ of the task-weight update. Default `0.1`.
- `rho`: non-negative $\\ell_2$ regularisation $\\rho$. Default `0.1`.
"""
