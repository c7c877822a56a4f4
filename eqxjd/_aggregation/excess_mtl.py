from typing import ClassVar

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from .._aggregator import AbstractStatefulWeightedAggregator
from .._checks import (
    check_matrix,
    check_range,
    check_scalar,
    check_state_shape,
    require_state,
    WEIGHTING_USAGE,
)
from .._custom_types import ScalarLike, State
from .._misc import all_finite, keep_state_unless
from .._scale import work_dtype
from .._weighting import AbstractStatefulWeighting, Reads


class _ExcessMTLState(eqx.Module):
    # sqrt(S), the root of the accumulated squared gradients: representable whenever
    # the gradients are (S itself would overflow or underflow far sooner).
    grad_root: Float[Array, "m n"]
    warmup_sum: Float[Array, " m"]
    weights: Float[Array, " m"]
    baseline: Float[Array, " m"]
    has_baseline: Bool[Array, ""]
    n_steps: Int[Array, ""]


class ExcessMTLWeighting(AbstractStatefulWeighting):
    r"""The weighting of [`eqxjd.ExcessMTL`][]; reads the Jacobian $J$ (not only the
    Gramian). At each call, with $Q = J \odot J$:

    $$S \leftarrow S + Q,\qquad e_i = \sum_k \frac{Q_{ik}}{\sqrt{S_{ik} + 10^{-7}}}$$

    ($e$ is the excess-risk proxy $g_i^\top H_i^{-1} g_i$ with the diagonal AdaGrad
    Hessian $H = \sqrt S$, Equations 6-7). During the first `n_warmup_steps` calls the
    weights stay uniform and $e$ is summed; afterwards $e$ is divided by the baseline
    $e_0 + 10^{-7}$ (the warm-up average, or, without warm-up, the first call's $e$,
    which is then used raw on that call), and

    $$w \leftarrow \operatorname{softmax}(\log w + \eta\, e)$$

    (Equation 9, exponentiated gradient; $w_0 = 1/m$). Stateful ($S \in
    \mathbb{R}^{m \times n}$: memory $O(mn)$, plus the warm-up sum, the weights, the
    baseline and the step count). Not differentiable. Non-finite input gives NaN
    weights and leaves the state unchanged. Not homogeneous (the $10^{-7}$ terms and
    the raw first excess risk depend on the scale), but finite for every finite
    Jacobian: the state keeps $\sqrt S$, and no squared gradient is formed.

    He et al., *Robust Multi-Task Learning with Excess Risks*, ICML 2024,
    [arXiv:2402.02009](https://arxiv.org/abs/2402.02009).
    """

    reads: ClassVar[Reads] = "matrix"

    robust_step_size: ScalarLike = 1.0
    n_warmup_steps: int = eqx.field(default=0, static=True)

    differentiable: ClassVar[bool] = False

    def __check_init__(self):
        check_scalar(self.robust_step_size, "robust_step_size")
        check_range(self.robust_step_size, "robust_step_size", 0.0, low_open=True)
        if not isinstance(self.n_warmup_steps, int) or self.n_warmup_steps < 0:
            raise ValueError(
                "`n_warmup_steps` must be a non-negative integer; got "
                f"n_warmup_steps={self.n_warmup_steps!r}."
            )

    def init(self, jacobian: Float[Array, "m n"], /) -> State:
        jacobian = check_matrix(jacobian)
        m, n = jacobian.shape
        dtype = work_dtype(jacobian.dtype)
        return _ExcessMTLState(
            grad_root=jnp.zeros((m, n), dtype),
            warmup_sum=jnp.zeros((m,), dtype),
            weights=jnp.full((m,), 1 / max(m, 1), dtype),
            baseline=jnp.zeros((m,), dtype),
            has_baseline=jnp.zeros((), bool),
            n_steps=jnp.zeros((), jnp.int32),
        )

    def __call__(
        self,
        jacobian: Float[Array, "m n"],
        state: State = None,
        /,
        *,
        key: PRNGKeyArray | None = None,
    ) -> tuple[Float[Array, " m"], State]:
        require_state(state, "ExcessMTLWeighting", WEIGHTING_USAGE)
        jacobian = check_matrix(jacobian)
        check_state_shape(state.grad_root.shape, jacobian.shape, "ExcessMTL")
        dtype = state.weights.dtype
        j = lax.stop_gradient(jacobian).astype(dtype)
        # Q / sqrt(S + 1e-7) written as |j| (|j| / hypot(sqrt(S), sqrt(1e-7))): no
        # square of a gradient is formed, so nothing overflows or underflows.
        grad_root = jnp.hypot(state.grad_root, j)
        h = jnp.hypot(grad_root, jnp.sqrt(jnp.asarray(1e-7, dtype)))
        magnitude = jnp.abs(j)
        excess = jnp.sum(magnitude * (magnitude / h), axis=1)

        warm = state.n_steps < self.n_warmup_steps
        n_steps = state.n_steps + 1
        warmup_sum = jnp.where(warm, state.warmup_sum + excess, state.warmup_sum)
        if self.n_warmup_steps > 0:
            first_baseline = state.warmup_sum / self.n_warmup_steps
            first_excess = excess / (first_baseline + 1e-7)
        else:
            first_baseline = excess
            first_excess = excess
        baseline = jnp.where(state.has_baseline, state.baseline, first_baseline)
        scaled = jnp.where(state.has_baseline, excess / (baseline + 1e-7), first_excess)
        eta = jnp.asarray(self.robust_step_size, dtype)
        # An overflowing step (a huge excess risk) becomes the largest finite one: the
        # softmax then gives all the weight to the largest logits, its limit.
        step = jnp.minimum(scaled * eta, jnp.finfo(dtype).max)
        updated = jax.nn.softmax(jnp.log(state.weights) + step)

        weights = jnp.where(warm, state.weights, updated)
        new_state = _ExcessMTLState(
            grad_root=grad_root,
            warmup_sum=warmup_sum,
            weights=weights,
            baseline=jnp.where(warm, state.baseline, baseline),
            has_baseline=state.has_baseline | ~warm,
            n_steps=n_steps,
        )
        finite = all_finite(j)
        new_state = keep_state_unless(finite, new_state, state)
        out = jnp.where(finite, weights, jnp.nan).astype(jacobian.dtype)
        return lax.stop_gradient(out), lax.stop_gradient(new_state)


_ARGS = """**Arguments:**

- `robust_step_size`: step size $\\eta > 0$ of the exponentiated weight update.
    Default `1.0`.
- `n_warmup_steps`: number of calls during which the weights stay uniform while the
    excess risks are averaged into the baseline (the paper recommends three epochs).
    `0` (default): the first call's excess risk is the baseline (official code, LibMTL).
"""
ExcessMTLWeighting.__init__.__doc__ = _ARGS


class ExcessMTL(AbstractStatefulWeightedAggregator):
    r"""ExcessMTL: $A(J) = J^\top w$ with task weights updated by an exponentiated
    gradient step on per-task excess-risk estimates,
    $w \leftarrow \operatorname{softmax}(\log w + \eta\, e / e_0)$, where
    $e_i = g_i^\top H_i^{-1} g_i$ uses a diagonal AdaGrad Hessian accumulated over the
    calls (see [`eqxjd.ExcessMTLWeighting`][]).

    Stateful: the state holds an $m \times n$ array (the accumulated squared
    gradients), so its memory grows with the number of parameters. Not differentiable.

    He et al., *Robust Multi-Task Learning with Excess Risks*, ICML 2024,
    [arXiv:2402.02009](https://arxiv.org/abs/2402.02009).
    """

    weighting: ExcessMTLWeighting

    def __init__(self, robust_step_size: ScalarLike = 1.0, n_warmup_steps: int = 0):
        self.weighting = ExcessMTLWeighting(robust_step_size, n_warmup_steps)


ExcessMTL.__init__.__doc__ = _ARGS
