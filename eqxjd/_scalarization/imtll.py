from collections.abc import Sequence

import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .._scale import promote_half
from .base import AbstractScalarizer, as_losses, as_shape, check_same_shape


class IMTLL(AbstractScalarizer):
    r"""IMTL-L, the loss-balancing part of Impartial Multi-Task Learning: each loss
    $L_i$ gets a learnable scale $s_i$, and

    $$\mathrm{IMTLL}(L) = \sum_i \big(e^{s_i} L_i - s_i\big).$$

    The $-s_i$ term prevents the trivial solution $s_i \to -\infty$. This equals
    $2\,\mathrm{UW}(L)$ evaluated at $-s$ (see [`eqxjd.scalarization.UW`][]); the
    gradient-balancing part, IMTL-G, is the aggregator `eqxjd.IMTLG`.

    Liu et al., *Towards Impartial Multi-task Learning*, ICLR 2021,
    [openreview.net/forum?id=IMPnRXEWpvr](https://openreview.net/forum?id=IMPnRXEWpvr).

    The scales are the field `log_scale` (initialised to $0$, so the initial value is
    $\sum_i L_i$), an ordinary inexact array trained with the model by
    `eqx.filter_grad`:

    !!! Example

        ```python
        imtll = eqxjd.scalarization.IMTLL(3)
        losses = jnp.array([1.0, 2.0, 3.0])
        grads = eqx.filter_grad(lambda s: s(losses))(imtll)
        grads.log_scale  # e^s * L - 1 = [0., 1., 2.]
        ```
    """

    log_scale: Float[Array, "*shape"]

    def __init__(self, shape: int | Sequence[int], *, dtype=None):
        """**Arguments:**

        - `shape`: the shape of the losses (an int `m` means `(m,)`); one scale per
            loss.
        - `dtype`: the dtype of `log_scale`; defaults to JAX's default float dtype. The
            computation itself runs in the losses' dtype. (Keyword only argument.)
        """
        dtype = jnp.result_type(float) if dtype is None else dtype
        self.log_scale = jnp.zeros(as_shape(shape), dtype)

    def __call__(
        self, losses: Float[Array, "*shape"], /, *, key: PRNGKeyArray | None = None
    ) -> Float[Array, ""]:
        losses = as_losses(losses)
        check_same_shape(self.log_scale, losses, "log_scale")
        work = promote_half(losses)
        s = self.log_scale.astype(work.dtype)
        return jnp.sum(jnp.exp(s) * work - s).astype(losses.dtype)
