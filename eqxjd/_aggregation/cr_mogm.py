import equinox as eqx
import jax.lax as lax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Float, Int, PRNGKeyArray

from .._checks import (
    check_gramian,
    check_matrix,
    check_range,
    check_scalar,
    check_state_shape,
    require_state,
    WEIGHTING_USAGE,
)
from .._custom_types import ScalarLike, State
from .._misc import all_finite, as_vector, keep_state_unless
from .._scale import call_scaled, promote_half, work_dtype
from .._weighting import AbstractStatefulWeighting, AbstractWeighting, Reads


class _CRMOGMState(eqx.Module):
    weights: Float[Array, " m"]
    started: Bool[Array, ""]
    inner: State


class CRMOGMWeighting(AbstractStatefulWeighting):
    r"""Smooths the weights of any weighting with an exponential moving average (the
    CR-MOGM weight-smoothing modifier). With $\hat\lambda_k$ the weights of the wrapped
    weighting at call $k$:

    $$\lambda_k = \alpha\,\lambda_{k-1} + (1 - \alpha)\,\hat\lambda_k,$$

    where $\lambda_0$ is `initial_weights` if given, else $\hat\lambda_1$ (so that the
    first output is $\hat\lambda_1$). $\alpha = 0$ returns the wrapped weights,
    $\alpha = 1$ freezes $\lambda_0$.

    Wraps a stateless or a stateful weighting, Gramian- or Jacobian-based (the
    statistic is passed through unchanged, and so is `key`). The state holds
    $\lambda_{k-1}$ and the wrapped weighting's state (`None` for a stateless one).
    Differentiable if and only if the wrapped weighting is. A call with non-finite
    input (or non-finite wrapped weights) returns NaN weights and leaves the moving
    average unchanged (the wrapped weighting's state follows its own rule). Build the
    aggregator with
    `eqxjd.StatefulWeightedAggregator(CRMOGMWeighting(eqxjd.UPGradWeighting()))`.
    The paper's schedule $\alpha_k = 1 - \mathrm{lr}_k/\mathrm{lr}_0$ is obtained
    by rebuilding the module with another `alpha` (`alpha` is an ordinary
    field, so `eqx.tree_at` works without retracing).

    Zhou et al., *On the Convergence of Stochastic Multi-Objective Gradient Manipulation
    and Beyond*, NeurIPS 2022.
    """

    weighting: AbstractWeighting | AbstractStatefulWeighting
    alpha: ScalarLike
    initial_weights: Float[Array, " m"] | None

    def __init__(
        self,
        weighting: AbstractWeighting | AbstractStatefulWeighting,
        alpha: ScalarLike = 0.9,
        initial_weights: Float[ArrayLike, " m"] | None = None,
    ):
        # Written out: the inherited abstract `reads` and `differentiable` are
        # properties here, not constructor arguments.
        self.weighting = weighting
        self.alpha = alpha
        self.initial_weights = as_vector(initial_weights, "initial_weights")

    def __check_init__(self):
        if not isinstance(
            self.weighting, (AbstractWeighting, AbstractStatefulWeighting)
        ):
            raise ValueError(
                "`weighting` must be an eqxjd weighting (AbstractWeighting or "
                f"AbstractStatefulWeighting); got {type(self.weighting).__name__}."
            )
        check_scalar(self.alpha, "alpha")
        check_range(self.alpha, "alpha", 0.0, 1.0)

    @property
    def reads(self) -> Reads:
        """What the weighting reads: as the wrapped weighting."""
        return self.weighting.reads

    @property
    def differentiable(self) -> bool:
        """Whether gradients flow through the weights: as the wrapped weighting."""
        return self.weighting.differentiable

    def init(self, stat: Float[Array, "m k"], /) -> State:
        stat = check_gramian(stat) if self.reads == "gramian" else check_matrix(stat)
        stat = promote_half(stat)
        m = stat.shape[0]
        dtype = work_dtype(stat.dtype)
        if isinstance(self.weighting, AbstractStatefulWeighting):
            inner = self.weighting.init(stat)
        else:
            inner = None
        if self.initial_weights is None:
            return _CRMOGMState(jnp.zeros((m,), dtype), jnp.zeros((), bool), inner)
        if self.initial_weights.shape != (m,):
            raise ValueError(
                f"`initial_weights` has shape {self.initial_weights.shape}, "
                f"expected ({m},)."
            )
        return _CRMOGMState(
            self.initial_weights.astype(dtype), jnp.ones((), bool), inner
        )

    def __call__(
        self,
        stat: Float[Array, "m k"],
        state: State = None,
        /,
        *,
        key: PRNGKeyArray | None = None,
    ) -> tuple[Float[Array, " m"], State]:
        require_state(state, "CRMOGMWeighting", WEIGHTING_USAGE)
        stat = check_matrix(stat, "stat")
        weights, state = self._scaled_call(promote_half(stat), None, state, key=key)
        return weights.astype(stat.dtype), state

    def _scaled_call(
        self,
        stat: Float[Array, "m k"],
        k: Int[Array, ""] | None,
        state: State = None,
        /,
        *,
        key: PRNGKeyArray | None = None,
    ) -> tuple[Float[Array, " m"], State]:
        # `stat * 4^k` for a rescaled Gramian (see `_scale.py`): passed on as it is.
        require_state(state, "CRMOGMWeighting", WEIGHTING_USAGE)
        stat = check_matrix(stat, "stat")
        m = stat.shape[0]
        if state.weights.shape != (m,):
            raise ValueError(
                "The number of objectives changed from "
                f"{state.weights.shape[0]} to {m}. Build a fresh state with `init` "
                "before changing the number of objectives."
            )
        if isinstance(self.weighting, AbstractStatefulWeighting):
            lambda_hat, inner = call_scaled(
                self.weighting, stat, k, state.inner, key=key
            )
        else:
            lambda_hat = call_scaled(self.weighting, stat, k, key=key)
            inner = state.inner
        check_state_shape(lambda_hat.shape, (m,), "CRMOGM")
        dtype = lambda_hat.dtype
        previous = jnp.where(state.started, state.weights.astype(dtype), lambda_hat)
        alpha = jnp.asarray(self.alpha, dtype)
        weights = alpha * previous + (1 - alpha) * lambda_hat
        if not self.differentiable:
            weights = lax.stop_gradient(weights)
        # The wrapped weighting keeps its own state policy; the moving average is not
        # updated by a step with non-finite input or weights.
        finite = all_finite(stat) & all_finite(lambda_hat)
        average, started = keep_state_unless(
            finite,
            (weights.astype(state.weights.dtype), jnp.ones((), bool)),
            (state.weights, state.started),
        )
        new_state = _CRMOGMState(average, started, inner)
        return jnp.where(finite, weights, jnp.nan), new_state


CRMOGMWeighting.__init__.__doc__ = """**Arguments:**

- `weighting`: the wrapped weighting (any [`eqxjd.AbstractWeighting`][] or
    [`eqxjd.AbstractStatefulWeighting`][]).
- `alpha`: EMA coefficient $\\alpha \\in [0, 1]$ on the previous weights. Default `0.9`.
- `initial_weights`: optional $\\lambda_0$, a 1-D array of shape `(m,)` (checked by
    `init`). `None` (default): $\\lambda_0 = \\hat\\lambda_1$.
"""
