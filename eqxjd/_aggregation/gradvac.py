from typing import ClassVar

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, Int, PRNGKeyArray

from .._aggregator import AbstractStatefulWeightedAggregator
from .._checks import (
    check_gramian,
    check_range,
    check_scalar,
    check_state_shape,
    require_key,
    require_state,
    WEIGHTING_USAGE,
)
from .._custom_types import ScalarLike, State
from .._misc import all_finite
from .._scale import to_window, wide_window, work_dtype
from .._weighting import AbstractStatefulWeighting, Reads


class _GradVacState(eqx.Module):
    phi_hat: Float[Array, "m m"]


def gradvac_orders(key: PRNGKeyArray, m: int) -> Int[Array, "m k"]:
    """The draws of [`eqxjd.GradVacWeighting`][]: one permutation of `range(m - 1)`
    per row (indices into the other rows, in increasing order), row `i` from the
    `i`-th subkey of `jax.random.split(key, m)`. TorchJD draws `torch.randperm(m - 1)`
    per row."""
    if m <= 1:
        return jnp.zeros((m, 0), jnp.int32)
    keys = jr.split(key, m)
    return jax.vmap(lambda k: jr.permutation(k, m - 1))(keys)


# Jitted (inlined under an outer jit) so that eager calls do not re-trace and
# re-compile the loop on every call.
@eqx.filter_jit
def gradvac_weights(
    gramian: Float[Array, "m m"],
    phi_hat: Float[Array, "m m"],
    orders: Int[Array, "m k"],
    beta: ScalarLike,
    eps: ScalarLike,
) -> tuple[Float[Array, " m"], Float[Array, "m m"]]:
    r"""The deterministic core of [`eqxjd.GradVacWeighting`][], with the visiting orders
    given (row `i` of `orders` indexes the rows other than `i`, as TorchJD's
    `randperm(m - 1)`). Returns the weights and the updated $\hat\phi$, in the dtype of
    `gramian`. With TorchJD's draws it reproduces TorchJD's weights and state.

    Non-finite input gives NaN weights and returns `phi_hat` unchanged. Half precision
    runs in float32; a Gramian too large or too small for sums of its entries is
    rescaled by a power of 4 first (the cosines do not change, and `eps` stays
    negligible, or dominant, as it is at the true scale).
    """
    gramian = check_gramian(gramian)
    m = gramian.shape[0]
    if orders.shape != (m, max(m - 1, 0)):
        raise ValueError(
            f"`orders` must have shape ({m}, {max(m - 1, 0)}); got {orders.shape}."
        )
    out_dtype = gramian.dtype
    dtype = work_dtype(out_dtype)
    gramian, _ = to_window(gramian.astype(dtype), wide_window(dtype))
    phi_hat = jnp.asarray(phi_hat).astype(dtype)
    orders = jnp.asarray(orders)
    if m <= 1:
        return jnp.ones((m,), out_dtype), phi_hat
    beta = jnp.asarray(beta, dtype)
    eps = jnp.asarray(eps, dtype)
    zero = jnp.zeros((), dtype)
    one = jnp.ones((), dtype)
    diag_norm = jnp.sqrt(jnp.maximum(jnp.diagonal(gramian), zero))

    def one_row(i, order, phi_row):
        # c: coefficients of g_i^PC = sum_k c_k g_k; cg: its inner products with g_j.
        def body(carry, idx):
            c, cg, phi_row = carry
            j = idx + (idx >= i).astype(idx.dtype)
            dot_ij = cg[j]
            norm_i = jnp.sqrt(jnp.maximum(jnp.sum(cg * c), zero))
            norm_j = diag_norm[j]
            phi = dot_ij / (norm_i * norm_j + eps)
            phi_h = phi_row[j]
            sqrt_1_phi2 = jnp.sqrt(jnp.maximum(one - phi * phi, zero))
            sqrt_1_hat2 = jnp.sqrt(jnp.maximum(one - phi_h * phi_h, zero))
            w = (
                norm_i
                * (phi_h * sqrt_1_phi2 - phi * sqrt_1_hat2)
                / (norm_j * sqrt_1_hat2 + eps)
            )
            correct = phi < phi_h
            c = jnp.where(correct, c.at[j].set(c[j] + w), c)
            cg = jnp.where(correct, cg + w * gramian[j], cg)
            phi_row = phi_row.at[j].set((one - beta) * phi_h + beta * phi)
            return (c, cg, phi_row), None

        c0 = jnp.zeros((m,), dtype).at[i].set(one)
        (c, _, phi_row), _ = lax.scan(body, (c0, gramian[i], phi_row), order)
        return c, phi_row

    coefficients, new_phi = jax.vmap(one_row)(jnp.arange(m), orders, phi_hat)
    finite = all_finite(gramian)
    weights = jnp.where(finite, jnp.sum(coefficients, axis=0), jnp.nan)
    return weights.astype(out_dtype), jnp.where(finite, new_phi, phi_hat)


class GradVacWeighting(AbstractStatefulWeighting):
    r"""The weighting of [`eqxjd.GradVac`][], computed from the Gramian only.

    With $g_i^{PC} = \sum_k C_{ik} g_k$ ($C = I$ initially), all quantities are read
    from $G$: $\|g_i^{PC}\|^2 = C_i G C_i^\top$ and $g_i^{PC} \cdot g_j = (C_i G)_j$.
    For every row $i$ and every other row $j$ (in a random order drawn from `key`), with
    $\phi = \cos(g_i^{PC}, g_j)$ and the target $\hat\phi_{ij}$ (state): if
    $\phi < \hat\phi_{ij}$,

    $$C_{ij} \mathrel{+}= \frac{\|g_i^{PC}\|\,(\hat\phi_{ij}\sqrt{1-\phi^2} -
    \phi\sqrt{1-\hat\phi_{ij}^2})}{\|g_j\|\sqrt{1-\hat\phi_{ij}^2} + \epsilon};$$

    always $\hat\phi_{ij} \leftarrow (1-\beta)\hat\phi_{ij} + \beta\phi$. The weights
    are the column sums of $C$ (a sum, as TorchJD). With $\hat\phi = 0$ (first call)
    this is PCGrad up to the $\epsilon$ terms.

    Stateful ($\hat\phi \in \mathbb{R}^{m \times m}$, zeros from `init`) and random
    (`key` required; one permutation per row). Not differentiable. The deterministic
    core is `gradvac_weights` (draws injected). Non-finite input gives NaN weights and
    leaves the state unchanged. With `eps = 0` the weights of $c\,G$ equal those of
    $G$ for every $c > 0$; with `eps > 0` they do up to the `eps` terms.

    Wang et al., *Gradient Vaccine: Investigating and Improving Multi-task Optimization
    in Massively Multilingual Models*, ICLR 2021,
    [arXiv:2010.05874](https://arxiv.org/abs/2010.05874).
    """

    reads: ClassVar[Reads] = "gramian"

    beta: ScalarLike = 0.5
    eps: ScalarLike = 1e-8

    differentiable: ClassVar[bool] = False

    def __check_init__(self):
        check_scalar(self.beta, "beta")
        check_scalar(self.eps, "eps")
        check_range(self.beta, "beta", 0.0, 1.0)
        check_range(self.eps, "eps", 0.0)

    def init(self, gramian: Float[Array, "m m"], /) -> State:
        gramian = check_gramian(gramian)
        m = gramian.shape[0]
        return _GradVacState(phi_hat=jnp.zeros((m, m), work_dtype(gramian.dtype)))

    def __call__(
        self,
        gramian: Float[Array, "m m"],
        state: State = None,
        /,
        *,
        key: PRNGKeyArray | None = None,
    ) -> tuple[Float[Array, " m"], State]:
        require_state(state, "GradVacWeighting", WEIGHTING_USAGE)
        gramian = check_gramian(gramian)
        m = gramian.shape[0]
        check_state_shape(state.phi_hat.shape, (m, m), "GradVac")
        key = require_key(key, "GradVac")
        orders = gradvac_orders(key, m)
        weights, phi = gradvac_weights(
            gramian, state.phi_hat, orders, self.beta, self.eps
        )
        new_state = _GradVacState(phi_hat=phi.astype(state.phi_hat.dtype))
        return lax.stop_gradient(weights), lax.stop_gradient(new_state)


_ARGS = """**Arguments:**

- `beta`: EMA rate $\\beta \\in [0, 1]$ of the cosine targets $\\hat\\phi$.
    Default `0.5`.
- `eps`: non-negative constant added to the denominators. Default `1e-8`.
"""
GradVacWeighting.__init__.__doc__ = _ARGS


class GradVac(AbstractStatefulWeightedAggregator):
    r"""Gradient Vaccine: $A(J) = \sum_i g_i^{PC}$, where each row $g_i$ is corrected
    towards every other row $g_j$ (visited in a random order) until its cosine
    similarity reaches an adaptive target $\hat\phi_{ij}$, an EMA of the observed
    cosines kept as state (see [`eqxjd.GradVacWeighting`][]).

    ```python
    aggregator = eqxjd.GradVac()
    state = aggregator.init(jacobian)
    d, state = aggregator(jacobian, state, key=key)
    ```

    Stateful, random (`key` required), not differentiable. For the paper's grouping
    strategies (whole model, encoder/decoder, per layer, per matrix), use one aggregator
    and one state per parameter group.

    Wang et al., *Gradient Vaccine: Investigating and Improving Multi-task Optimization
    in Massively Multilingual Models*, ICLR 2021,
    [arXiv:2010.05874](https://arxiv.org/abs/2010.05874).
    """

    weighting: GradVacWeighting

    def __init__(self, beta: ScalarLike = 0.5, eps: ScalarLike = 1e-8):
        self.weighting = GradVacWeighting(beta, eps)


GradVac.__init__.__doc__ = _ARGS
