from collections.abc import Sequence

import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .._scale import promote_half
from .base import AbstractScalarizer, as_losses, as_shape, check_same_shape


class UW(AbstractScalarizer):
    r"""Uncertainty Weighting: each loss $L_i$ gets a learnable log-variance
    $s_i = \log \sigma_i^2$, and

    $$\mathrm{UW}(L) = \sum_i \Big(\tfrac12 e^{-s_i} L_i + \tfrac12 s_i\Big).$$

    Kendall et al., *Multi-Task Learning Using Uncertainty to Weigh Losses for Scene
    Geometry and Semantics*, CVPR 2018,
    [arXiv:1705.07115](https://arxiv.org/abs/1705.07115).

    The log-variances are the field `log_var` (initialised to $0$, i.e. uniform
    weights), an ordinary inexact array: put the scalarizer next to the model and
    differentiate with respect to both, so that the same optimiser trains $s$. Resetting
    is building a new `UW`.

    !!! Example

        ```python
        import equinox as eqx
        import jax
        import jax.numpy as jnp
        import jax.random as jr
        import optax

        model = eqx.nn.Linear(3, 2, key=jr.key(0))
        params = (model, eqxjd.scalarization.UW(2))
        optim = optax.sgd(0.1)
        opt_state = optim.init(eqx.filter(params, eqx.is_inexact_array))

        @eqx.filter_jit
        def step(params, opt_state, x):
            def loss_fn(params):
                model, uw = params
                losses = jnp.mean(jax.vmap(model)(x) ** 2, axis=0)  # one per output
                return uw(losses)

            grads = eqx.filter_grad(loss_fn)(params)  # grads[1].log_var: d/ds
            updates, opt_state = optim.update(grads, opt_state)
            return eqx.apply_updates(params, updates), opt_state

        params, opt_state = step(params, opt_state, jr.normal(jr.key(1), (8, 3)))
        ```
    """

    log_var: Float[Array, "*shape"]

    def __init__(self, shape: int | Sequence[int], *, dtype=None):
        """**Arguments:**

        - `shape`: the shape of the losses (an int `m` means `(m,)`); one log-variance
            per loss.
        - `dtype`: the dtype of `log_var`; defaults to JAX's default float dtype. The
            computation itself runs in the losses' dtype. (Keyword only argument.)
        """
        dtype = jnp.result_type(float) if dtype is None else dtype
        self.log_var = jnp.zeros(as_shape(shape), dtype)

    def __call__(
        self, losses: Float[Array, "*shape"], /, *, key: PRNGKeyArray | None = None
    ) -> Float[Array, ""]:
        losses = as_losses(losses)
        check_same_shape(self.log_var, losses, "log_var")
        work = promote_half(losses)
        s = self.log_var.astype(work.dtype)
        half = jnp.asarray(0.5, work.dtype)
        out = jnp.sum(half * jnp.exp(-s) * work + half * s)
        return out.astype(losses.dtype)
