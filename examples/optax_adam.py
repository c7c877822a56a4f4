"""Jacobian descent with optax: [`eqxjd.as_optax`][] in front of `optax.adam`.

`eqxjd.as_optax(aggregator)` is a gradient transformation whose input "updates" are
the Jacobian pytree (a leading axis of size `m` on every leaf) and whose output is the
aggregated update; anything after it in `optax.chain` sees ordinary gradients. It must
come first in the chain. The seed example (two MSE losses) trained with Adam.
"""

import pathlib
import sys

import equinox as eqx
import eqxjd
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax


sys.path.insert(0, str(pathlib.Path(__file__).parent))
from basic_usage import losses_fn, make_model, save_plot  # noqa: E402


def main(steps=100, quick=False, seed=0, lr=1e-2, plot=True):
    """Returns the losses before each step, shape (steps, 2)."""
    if quick:
        steps = min(steps, 10)
    kmodel, kx, ky = jr.split(jr.key(seed), 3)
    model = make_model(kmodel)
    x = jr.normal(kx, (16, 10))
    y = jr.normal(ky, (16, 2))
    optim = optax.chain(eqxjd.as_optax(eqxjd.UPGrad()), optax.adam(lr))
    # optax is not clean under JAX's strict dtype promotion: use the standard rules.
    with jax.numpy_dtype_promotion("standard"):
        opt_state = optim.init(eqx.filter(model, eqx.is_inexact_array))
    value_and_jac = eqxjd.filter_value_and_jac(losses_fn)

    @eqx.filter_jit
    def step(model, opt_state, x, y):
        losses, jac = value_and_jac(model, x, y)
        params = eqx.filter(model, eqx.is_inexact_array)
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = optim.update(jac, opt_state, params)
        return eqx.apply_updates(model, updates), opt_state, losses

    history = []
    for i in range(steps):
        model, opt_state, losses = step(model, opt_state, x, y)
        history.append(losses)
        if i % max(steps // 10, 1) == 0 or i == steps - 1:
            print(
                f"step {i:4d}   loss1 {float(losses[0]):.5f}   "
                f"loss2 {float(losses[1]):.5f}"
            )
    history = np.asarray(jnp.stack(history))
    if plot:
        path = save_plot(history, ["loss1", "loss2"], "optax_adam", "UPGrad + Adam")
        print(f"plot saved to {path}")
    return history


if __name__ == "__main__":
    main()
