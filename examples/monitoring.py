"""Monitoring Jacobian descent: the weights and the cosine similarity between the
aggregated update and the mean gradient, at every step.

TorchJD does this with hooks on the aggregator. In eqxjd the Jacobian, the update and
the weights are ordinary return values: [`eqxjd.filter_value_and_jac`][] gives the
Jacobian pytree and [`eqxjd.aggregate`][] aggregates it and returns the weights.
"""

import pathlib
import sys

import equinox as eqx
import eqxjd
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np


sys.path.insert(0, str(pathlib.Path(__file__).parent))
from basic_usage import losses_fn, make_model, save_plot  # noqa: E402


def flat(tree):
    return jnp.concatenate([leaf.reshape(-1) for leaf in jtu.tree_leaves(tree)])


def make_step(aggregator, lr):
    value_and_jac = eqxjd.filter_value_and_jac(losses_fn)

    @eqx.filter_jit
    def step(model, x, y):
        losses, jac = value_and_jac(model, x, y)
        out = eqxjd.aggregate(aggregator, jac)
        update, weights = out.update, out.weights
        mean_grad = jtu.tree_map(lambda leaf: jnp.mean(leaf, axis=0), jac)
        a, g = flat(update), flat(mean_grad)
        cosine = a @ g / (jnp.linalg.norm(a) * jnp.linalg.norm(g))
        model = eqx.apply_updates(model, jtu.tree_map(lambda u: -lr * u, update))
        return model, losses, weights, cosine

    return step


def main(steps=50, quick=False, seed=0, lr=0.1, plot=True):
    """Returns the losses before each step, shape (steps, 2); prints the monitoring."""
    if quick:
        steps = min(steps, 8)
    kmodel, kx, ky = jr.split(jr.key(seed), 3)
    model = make_model(kmodel)
    x = jr.normal(kx, (16, 10))
    y = jr.normal(ky, (16, 2))
    step = make_step(eqxjd.UPGrad(), lr)
    history, cosines = [], []
    for i in range(steps):
        model, losses, weights, cosine = step(model, x, y)
        history.append(losses)
        cosines.append(float(cosine))
        print(
            f"step {i:3d}   losses {np.round(np.asarray(losses), 4)}   "
            f"weights {np.round(np.asarray(weights), 4)}   cos(update, mean grad) "
            f"{float(cosine):.4f}"
        )
    history = np.asarray(jnp.stack(history))
    if plot:
        path = save_plot(history, ["loss1", "loss2"], "monitoring", "UPGrad, monitored")
        print(f"plot saved to {path}")
    return history


if __name__ == "__main__":
    main()
