"""Partial Jacobian descent: the weights come from the last layers only.

Instance-wise risk minimisation as in `iwrm.py`, but the Jacobian (hence the Gramian
and the [`eqxjd.UPGrad`][] weights) is taken with respect to the last layers of the
network only, which is cheaper for a large network. All parameters are then updated
along the gradient of $\\sum_i w_i L_i$. The `filter_spec` plays the part of the
modules given to TorchJD's `Engine` (its `Engine(model[2:])` example).
"""

import pathlib
import sys

import equinox as eqx
import eqxjd
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np


sys.path.insert(0, str(pathlib.Path(__file__).parent))
from basic_usage import save_plot  # noqa: E402


def make_model(key, hidden=8):
    k1, k2, k3 = jr.split(key, 3)
    return eqx.nn.Sequential(
        [
            eqx.nn.Linear(10, hidden, key=k1),
            eqx.nn.Lambda(jax.nn.relu),
            eqx.nn.Linear(hidden, hidden, key=k2),
            eqx.nn.Lambda(jax.nn.relu),
            eqx.nn.Linear(hidden, 1, key=k3),
        ]
    )


def per_sample_losses(model, x, y):
    return (jax.vmap(model)(x)[:, 0] - y) ** 2


def last_layers(model):
    """A filter spec (as in `eqx.partition`) selecting the last two linear layers."""
    spec = jtu.tree_map(lambda _: False, model)
    return eqx.tree_at(lambda m: (m.layers[2], m.layers[4]), spec, replace=(True, True))


def make_step(lr, aggregator, spec):
    # The Jacobian w.r.t. the selected layers gives the weights; every parameter is
    # updated along the gradient of w^T L.
    value_and_update = eqxjd.filter_value_and_aggregate(
        per_sample_losses, aggregator, filter_spec=spec
    )

    @eqx.filter_jit
    def step(model, x, y):
        out = value_and_update(model, x, y)
        model = eqx.apply_updates(model, jtu.tree_map(lambda g: -lr * g, out.update))
        return model, out.losses, out.weights

    return step


def main(epochs=30, quick=False, seed=0, lr=0.05, batches=8, batch_size=16, plot=True):
    """Returns the mean training loss of each epoch, shape (epochs, 1)."""
    if quick:
        epochs, batches, batch_size = min(epochs, 4), 2, 8
    kmodel, kx, ky = jr.split(jr.key(seed), 3)
    x = jr.normal(kx, (batches, batch_size, 10))
    y = jr.normal(ky, (batches, batch_size))
    model = make_model(kmodel)
    step = make_step(lr, eqxjd.UPGrad(), last_layers(model))
    history = []
    for epoch in range(epochs):
        losses, weights = [], []
        for b in range(batches):
            model, batch_losses, batch_weights = step(model, x[b], y[b])
            losses.append(batch_losses)
            weights.append(batch_weights)
        history.append(float(jnp.mean(jnp.stack(losses))))
        weights = weights[-1]
        if epoch % max(epochs // 5, 1) == 0 or epoch == epochs - 1:
            print(
                f"epoch {epoch:3d}   mean loss {history[-1]:.5f}   "
                f"weights in [{float(weights.min()):.3f}, {float(weights.max()):.3f}]"
            )
    history = np.asarray(history)[:, None]
    if plot:
        path = save_plot(
            history,
            ["mean loss"],
            "partial_jd",
            "Partial JD (last layers)",
            xlabel="epoch",
        )
        print(f"plot saved to {path}")
    return history


if __name__ == "__main__":
    main()
