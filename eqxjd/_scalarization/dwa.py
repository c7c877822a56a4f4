import equinox as eqx
import jax.lax as lax
import jax.nn as jnn
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from .._checks import check_positive, require_state, SCALARIZER_USAGE
from .._custom_types import ScalarLike, State
from .._misc import all_finite, keep_state_unless
from .._scale import promote_half, work_dtype
from .base import AbstractStatefulScalarizer, as_losses, constant


class _DWAState(eqx.Module):
    loss_sum: Float[Array, "*shape"]  # sum of the current epoch's batch losses
    num_batches: Int[Array, ""]  # batches seen in the current epoch
    averages: Float[Array, "2 ..."]  # epoch averages [t - 2, t - 1]
    num_averages: Int[Array, ""]  # how many of `averages` are valid (0, 1 or 2)


def _check_state(state: State, losses: Float[Array, "*shape"]) -> None:
    if state.loss_sum.shape != losses.shape:
        raise ValueError(
            f"The DWA state was built for losses of shape {state.loss_sum.shape} but "
            f"`losses` has shape {losses.shape}; call `init` again to change the shape."
        )


class DWA(AbstractStatefulScalarizer):
    r"""Dynamic Weight Average: each loss is weighted by how fast it decreased over the
    last two epochs,

    $$\sum_k \lambda_k L_k, \qquad
    \lambda_k = K\,\operatorname{softmax}\Big(\frac{r}{T}\Big)_k, \qquad
    r_k = \frac{\bar L_k(t-1)}{\bar L_k(t-2)},$$

    where $\bar L(t)$ is the average of the batch losses over epoch $t$, $T$ the
    temperature and $K$ the number of losses (so $\sum_k \lambda_k = K$). During the
    first two epochs, before two averages exist, $\lambda = 1$. The weights are
    constants (no gradient flows into them).

    Liu, Johns & Davison, *End-to-End Multi-Task Learning with Attention*, CVPR 2019,
    [arXiv:1803.10704](https://arxiv.org/abs/1803.10704).

    The epoch history is an explicit state with two pure transitions: `update` records a
    batch's losses (TorchJD does this inside the call) and `step` closes the epoch
    (TorchJD's `step()`):

    !!! Example

        ```python
        dwa = eqxjd.scalarization.DWA()
        state = dwa.init(jnp.zeros(num_tasks))
        for epoch in range(num_epochs):
            for batch in batches:
                def loss_fn(model):
                    losses = compute_losses(model, batch)  # shape (num_tasks,)
                    return dwa(losses, state), losses
                (loss, losses), grads = eqx.filter_value_and_grad(
                    loss_fn, has_aux=True
                )(model)
                ...  # apply `grads` to the model
                state = dwa.update(state, losses)  # record the batch
            state = dwa.step(state)  # once per epoch
        ```

    All three functions are pure and jit-compatible; the state's structure never
    changes. `step` is a no-op when no batch was recorded since the last `step`, and
    `update` with a NaN or infinite loss returns the state unchanged (the batch is not
    recorded). Resetting is calling `init` again.
    """

    temperature: ScalarLike = 2.0

    def __check_init__(self):
        check_positive(self.temperature, "temperature")

    def init(self, losses: Float[Array, "*shape"], /) -> State:
        """**Arguments:**

        - `losses`: an example of the losses (only its shape and dtype are read).

        **Returns:**

        The initial state: no batch recorded, no epoch average.
        """
        losses = as_losses(losses)
        zero = jnp.zeros(losses.shape, work_dtype(losses.dtype))
        return _DWAState(
            loss_sum=zero,
            num_batches=jnp.array(0, jnp.int32),
            averages=jnp.stack([zero, zero]),
            num_averages=jnp.array(0, jnp.int32),
        )

    def weights(
        self, losses: Float[Array, "*shape"], state: State, /
    ) -> Float[Array, "*shape"]:
        r"""**Arguments:**

        - `losses`: the losses (only their shape and dtype are read).
        - `state`: the current state.

        **Returns:**

        The weights $\lambda$ (shape of `losses`): $1$ before two epoch averages exist,
        else $K \operatorname{softmax}(r / T)$.
        """
        losses = as_losses(losses)
        return self._weights(promote_half(losses), state).astype(losses.dtype)

    def _weights(
        self, losses: Float[Array, "*shape"], state: State
    ) -> Float[Array, "*shape"]:
        _check_state(state, losses)
        dtype = losses.dtype
        older = state.averages[0].astype(dtype)
        newer = state.averages[1].astype(dtype)
        ready = state.num_averages >= 2
        safe_older = jnp.where(ready, older, jnp.ones_like(older))
        rates = (newer / safe_older).reshape(-1)
        temperature = constant(self.temperature, dtype)
        size = jnp.asarray(losses.size, dtype)
        dwa = size * jnn.softmax(rates / temperature).reshape(losses.shape)
        return lax.stop_gradient(jnp.where(ready, dwa, jnp.ones_like(dwa)))

    def __call__(
        self,
        losses: Float[Array, "*shape"],
        state: State = None,
        /,
        *,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, ""]:
        """**Arguments:**

        - `losses`: the current batch's losses, with the shape given to `init`.
        - `state`: the current state (read, never modified).
        - `key`: ignored; provided for compatibility. (Keyword only argument.)

        **Returns:**

        The scalarized loss $\\sum_k \\lambda_k L_k$, a scalar.
        """
        require_state(state, "DWA", SCALARIZER_USAGE)
        losses = as_losses(losses)
        work = promote_half(losses)
        return jnp.sum(self._weights(work, state) * work).astype(losses.dtype)

    def update(self, state: State, losses: Float[Array, "*shape"], /) -> State:
        """Records one batch's losses in the current epoch's sum (their gradient is
        stopped).

        **Arguments:**

        - `state`: the current state.
        - `losses`: the batch's losses, with the shape given to `init`.

        **Returns:**

        The new state.
        """
        losses = as_losses(losses)
        _check_state(state, losses)
        batch = lax.stop_gradient(losses).astype(state.loss_sum.dtype)
        new_state = _DWAState(
            loss_sum=state.loss_sum + batch,
            num_batches=state.num_batches + 1,
            averages=state.averages,
            num_averages=state.num_averages,
        )
        # A batch with a non-finite loss is not recorded.
        return keep_state_unless(all_finite(batch), new_state, state)

    def step(self, state: State, /) -> State:
        """Closes the epoch: its average loss becomes the newest of the two kept
        averages (the oldest is dropped) and the epoch sum is cleared. A no-op if no
        batch was recorded since the last `step`.

        **Arguments:**

        - `state`: the current state.

        **Returns:**

        The new state.
        """
        seen = state.num_batches > 0
        count = jnp.maximum(state.num_batches, 1).astype(state.loss_sum.dtype)
        average = state.loss_sum / count
        rolled = jnp.stack([state.averages[1], average])
        return _DWAState(
            loss_sum=jnp.zeros_like(state.loss_sum),
            num_batches=jnp.zeros_like(state.num_batches),
            averages=jnp.where(seen, rolled, state.averages),
            num_averages=jnp.where(
                seen, jnp.minimum(state.num_averages + 1, 2), state.num_averages
            ),
        )


DWA.__init__.__doc__ = """**Arguments:**

- `temperature`: the temperature $T > 0$; larger values give more uniform weights.
    Default `2.0` (the paper's value).
"""
