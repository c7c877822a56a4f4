"""Grouping: different aggregations for different parts of the model.

The GradVac paper compares four ways to apply a multi-objective aggregator: to the
whole model, per network (here: shared trunk versus the rest), per layer, and per
tensor. [`eqxjd.Grouped`][] expresses each as a list of `(where, aggregator)` pairs,
`where` selecting nodes of the model as in `eqx.tree_at`; TorchJD makes one
`jac_to_grad` call per group. Each strategy is trained with [`eqxjd.UPGrad`][] on the
same two-loss regression problem.
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


def make_model(key, hidden=16):
    k1, k2, k3 = jr.split(key, 3)
    return eqx.nn.Sequential(
        [
            eqx.nn.Linear(10, hidden, key=k1),
            eqx.nn.Lambda(jax.nn.relu),
            eqx.nn.Linear(hidden, hidden, key=k2),
            eqx.nn.Lambda(jax.nn.relu),
            eqx.nn.Linear(hidden, 2, key=k3),
        ]
    )


def losses_fn(model, x, y):
    return jnp.mean((jax.vmap(model)(x) - y) ** 2, axis=0)


def strategies():
    upgrad = eqxjd.UPGrad()
    layers = (0, 2, 4)
    return {
        "whole model": upgrad,
        "per network": eqxjd.Grouped(
            (lambda m: m.layers[0], upgrad),
            (lambda m: (m.layers[2], m.layers[4]), upgrad),
        ),
        "per layer": eqxjd.Grouped(
            *[(lambda m, i=i: m.layers[i], upgrad) for i in layers]
        ),
        "per tensor": eqxjd.Grouped(
            *[(lambda m, i=i: m.layers[i].weight, upgrad) for i in layers],
            *[(lambda m, i=i: m.layers[i].bias, upgrad) for i in layers],
        ),
    }


def main(steps=100, quick=False, seed=0, lr=0.1, plot=True):
    """Returns {strategy: losses before each step, shape (steps, 2)}."""
    hidden, selected = 16, None
    if quick:  # two strategies, tiny network
        steps, hidden, selected = min(steps, 8), 4, ("whole model", "per layer")
    kmodel, kx, ky = jr.split(jr.key(seed), 3)
    x = jr.normal(kx, (32, 10))
    y = jr.normal(ky, (32, 2))
    histories = {}
    for name, aggregator in strategies().items():
        if selected is not None and name not in selected:
            continue
        value_and_update = eqxjd.filter_value_and_aggregate(losses_fn, aggregator)

        @eqx.filter_jit
        def step(model, x, y):
            out = value_and_update(model, x, y)
            update = jtu.tree_map(lambda u: -lr * u, out.update)
            return eqx.apply_updates(model, update), out.losses

        model = make_model(kmodel, hidden)
        history = []
        for _ in range(steps):
            model, losses = step(model, x, y)
            history.append(losses)
        histories[name] = np.asarray(jnp.stack(history))
        first, last = histories[name][0], histories[name][-1]
        print(
            f"{name:12s}  losses {np.round(first, 4)} -> {np.round(last, 4)} "
            f"after {steps} steps"
        )
    if plot:
        names = list(histories)
        path = save_plot(
            np.concatenate([histories[n] for n in names], axis=1),
            [f"{label} ({n})" for n in names for label in ("loss1", "loss2")],
            "grouping",
            "UPGrad with four grouping strategies",
        )
        print(f"plot saved to {path}")
    return histories


if __name__ == "__main__":
    main()
