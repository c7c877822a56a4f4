# The algorithm follows the official implementation, https://github.com/Cranial-XIX/FAMO
# (MIT License, Copyright (c) 2023 Bo Liu), as adapted by TorchJD 0.18.0.
from collections.abc import Sequence

import equinox as eqx
import jax.lax as lax
import jax.nn as jnn
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, Int, PRNGKeyArray

from .._checks import check_nonnegative, require_state, SCALARIZER_USAGE
from .._custom_types import ScalarLike, State
from .._misc import all_finite, keep_state_unless
from .._scale import promote_half, work_dtype
from .base import (
    AbstractStatefulScalarizer,
    as_float_array,
    as_losses,
    as_shape,
    constant,
)


_EPSILON = 1e-8
_BETA1 = 0.9
_BETA2 = 0.999
_ADAM_EPS = 1e-8


class _FAMOState(eqx.Module):
    logits: Float[Array, "*shape"]  # the task-weighting logits w
    exp_avg: Float[Array, "*shape"]  # Adam's first moment
    exp_avg_sq: Float[Array, "*shape"]  # Adam's second moment
    count: Int[Array, ""]  # Adam steps taken


class FAMO(AbstractStatefulScalarizer):
    r"""Fast Adaptive Multitask Optimization: decreases all losses at about the same
    rate using only their values. With logits $w$ (internal state),

    $$c \sum_i z_i \log(L_i - b_i + \epsilon), \qquad z = \operatorname{softmax}(w),
    \qquad c = \Big(\sum_i \frac{z_i}{L_i - b_i + \epsilon}\Big)^{-1},$$

    where $b$ are lower bounds on the losses (`min_losses`), $\epsilon = 10^{-8}$, and
    $z$ and $c$ are constants for differentiation, so that
    $\partial/\partial L_i = c\, z_i / (L_i - b_i + \epsilon)$: the gradient of the
    scalarized loss is a convex combination of the task gradients.

    The logits are learned by `update`, after the model step, from the losses
    recomputed on the same batch: with
    $\delta_i = \log(L_i^{\mathrm{before}} - b_i + \epsilon) -
    \log(L_i^{\mathrm{after}} - b_i + \epsilon)$, one step of Adam
    ($\beta = (0.9, 0.999)$, $10^{-8}$, L2 weight decay added to the gradient, exactly
    as `torch.optim.Adam`) is taken on $w$ along the gradient of
    $w \mapsto \delta^\top \operatorname{softmax}(w)$.

    Liu et al., *FAMO: Fast Adaptive Multitask Optimization*, NeurIPS 2023,
    [arXiv:2306.03792](https://arxiv.org/abs/2306.03792).

    The logits and Adam's moments are an explicit state, updated only by the pure
    function `update` (never by the user's optimiser, and never through the call):

    !!! Example

        ```python
        famo = eqxjd.scalarization.FAMO(num_tasks)
        state = famo.init(jnp.zeros(num_tasks))

        @eqx.filter_jit
        def train_step(model, opt_state, state, batch):
            def loss_fn(model):
                losses = compute_losses(model, batch)  # shape (num_tasks,), > 0
                return famo(losses, state), losses
            (loss, losses), grads = eqx.filter_value_and_grad(
                loss_fn, has_aux=True
            )(model)
            updates, opt_state = optim.update(grads, opt_state, model)
            model = eqx.apply_updates(model, updates)
            new_losses = compute_losses(model, batch)  # same batch, after the step
            state = famo.update(state, losses, new_losses)
            return model, opt_state, state
        ```

    TorchJD's `update(new_losses)` uses the losses of the last call, stored
    internally; here they are passed explicitly, so there is no "update before call"
    error. Resetting is calling `init` again.

    !!! warning

        The losses must stay above `min_losses` ($L - b + \epsilon > 0$); this is not
        checked (as in TorchJD) and otherwise the logarithm gives NaN.
    """

    shape: tuple[int, ...] = eqx.field(static=True)
    min_losses: Float[Array, "*shape"]
    lr: ScalarLike
    weight_decay: ScalarLike

    def __init__(
        self,
        shape: int | Sequence[int],
        min_losses: Float[ArrayLike, "*shape"] | None = None,
        lr: ScalarLike = 0.025,
        weight_decay: ScalarLike = 1e-3,
    ):
        """**Arguments:**

        - `shape`: the shape of the losses (an int `m` means `(m,)`); one logit per
            loss.
        - `min_losses`: the lower bounds $b$ subtracted before the logarithm, an array
            of shape `shape`; `None` (default) means zeros, so the losses must then be
            strictly positive.
        - `lr`: the learning rate $\\geq 0$ of the internal Adam on the logits. Default
            `0.025` (the paper's value).
        - `weight_decay`: the L2 weight decay $\\geq 0$ of the internal Adam. Default
            `1e-3` (the paper's Algorithm 2; the official code uses `1e-5`).
        """
        self.shape = as_shape(shape)
        if min_losses is None:
            self.min_losses = jnp.zeros(self.shape, jnp.result_type(float))
        else:
            min_losses = as_float_array(min_losses)
            assert min_losses is not None
            if min_losses.shape != self.shape:
                raise ValueError(
                    f"`min_losses` must have shape {self.shape} (the shape of the "
                    f"losses); got {min_losses.shape}."
                )
            self.min_losses = min_losses
        self.lr = lr
        self.weight_decay = weight_decay

    def __check_init__(self):
        check_nonnegative(self.lr, "lr")
        check_nonnegative(self.weight_decay, "weight_decay")

    def _check(self, losses: Array, name: str = "losses") -> Array:
        losses = as_losses(losses)
        if losses.shape != self.shape:
            raise ValueError(
                f"`{name}` must have shape {self.shape} (the `shape` given to FAMO); "
                f"got {losses.shape}."
            )
        return losses

    def _check_state(self, state: State) -> None:
        if state.logits.shape != self.shape:
            raise ValueError(
                f"The FAMO state was built for shape {state.logits.shape}, not "
                f"{self.shape}; call `init` again."
            )

    def init(self, losses: Float[Array, "*shape"], /) -> State:
        """**Arguments:**

        - `losses`: an example of the losses, of shape `shape` (only its dtype is
            read; the state uses it).

        **Returns:**

        The initial state: zero logits (uniform weights) and a fresh Adam.
        """
        losses = self._check(losses)
        zero = jnp.zeros(self.shape, work_dtype(losses.dtype))
        return _FAMOState(
            logits=zero,
            exp_avg=zero,
            exp_avg_sq=zero,
            count=jnp.array(0, jnp.int32),
        )

    def weights(self, state: State, /) -> Float[Array, "*shape"]:
        r"""**Arguments:**

        - `state`: the current state.

        **Returns:**

        The task weights $z = \operatorname{softmax}(w)$, an array of shape `shape`.
        """
        self._check_state(state)
        return jnn.softmax(state.logits.reshape(-1)).reshape(self.shape)

    def __call__(
        self,
        losses: Float[Array, "*shape"],
        state: State = None,
        /,
        *,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, ""]:
        """**Arguments:**

        - `losses`: the losses, of shape `shape`.
        - `state`: the current state (read, never modified).
        - `key`: ignored; provided for compatibility. (Keyword only argument.)

        **Returns:**

        The scalarized loss, a scalar with the dtype of `losses`.
        """
        require_state(state, "FAMO", SCALARIZER_USAGE)
        losses = self._check(losses)
        work = promote_half(losses)
        dtype = work.dtype
        z = lax.stop_gradient(self.weights(state).astype(dtype))
        shifted = work - constant(self.min_losses, dtype) + jnp.asarray(_EPSILON, dtype)
        normalizer = lax.stop_gradient(jnp.sum(z / shifted))
        return jnp.sum((z / normalizer) * jnp.log(shifted)).astype(losses.dtype)

    def update(
        self,
        state: State,
        losses: Float[Array, "*shape"],
        new_losses: Float[Array, "*shape"],
        /,
    ) -> State:
        """One Adam step on the logits, from the change of the losses across a model
        step. Gradients through `losses` and `new_losses` are stopped.

        **Arguments:**

        - `state`: the state used to compute the scalarized loss of `losses`.
        - `losses`: the losses before the model step (the ones that were scalarized).
        - `new_losses`: the losses on the same batch after the model step.

        **Returns:**

        The new state (unchanged if a loss is NaN or infinite, or not above its
        bound).
        """
        losses = self._check(losses)
        new_losses = self._check(new_losses, "new_losses")
        self._check_state(state)
        dtype = state.logits.dtype
        b = constant(self.min_losses, dtype)
        eps = jnp.asarray(_EPSILON, dtype)
        before = lax.stop_gradient(losses).astype(dtype) - b + eps
        after = lax.stop_gradient(new_losses).astype(dtype) - b + eps
        delta = (jnp.log(before) - jnp.log(after)).reshape(-1)
        # Gradient of w -> delta . softmax(w) (a vector-Jacobian product of softmax).
        z = jnn.softmax(state.logits.reshape(-1))
        grad = (z * (delta - jnp.sum(z * delta))).reshape(self.shape)

        # One step of torch.optim.Adam (amsgrad=False, maximize=False), op for op.
        lr = constant(self.lr, dtype)
        grad = grad + constant(self.weight_decay, dtype) * state.logits
        count = state.count + 1
        beta1 = jnp.asarray(_BETA1, dtype)
        beta2 = jnp.asarray(_BETA2, dtype)
        exp_avg = state.exp_avg + (1 - beta1) * (grad - state.exp_avg)  # lerp
        exp_avg_sq = beta2 * state.exp_avg_sq + (1 - beta2) * grad * grad
        step = count.astype(dtype)
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        step_size = lr / bias_correction1
        denom = jnp.sqrt(exp_avg_sq) / jnp.sqrt(bias_correction2) + jnp.asarray(
            _ADAM_EPS, dtype
        )
        logits = state.logits - step_size * exp_avg / denom
        new_state = _FAMOState(
            logits=logits, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq, count=count
        )
        # Non-finite losses (or a log of a loss at or below its bound) are not learned
        # from: the state is returned unchanged.
        return keep_state_unless(all_finite(delta), new_state, state)
