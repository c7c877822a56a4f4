"""Basic usage: Jacobian descent on a model with two losses.

The seed example of TorchJD's documentation, in eqxjd: a `Linear(10, 5) -> ReLU ->
Linear(5, 2)` regression model, a batch of 16 inputs, one MSE loss per output, and
plain SGD (learning rate 0.1) along the aggregation of the two losses' gradients by
[`eqxjd.UPGrad`][]. TorchJD writes this as `backward([loss1, loss2])`,
`jac_to_grad(model.parameters(), UPGrad())`, `optimizer.step()`; in eqxjd the whole
step is one function, compiled with `eqx.filter_jit`.

Run it with `python examples/basic_usage.py` (needs matplotlib for the plot).
"""

import pathlib

import equinox as eqx
import eqxjd
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np


OUTPUT = pathlib.Path(__file__).parent / "output"


def make_model(key):
    k1, k2 = jr.split(key)
    return eqx.nn.Sequential(
        [
            eqx.nn.Linear(10, 5, key=k1),
            eqx.nn.Lambda(jax.nn.relu),
            eqx.nn.Linear(5, 2, key=k2),
        ]
    )


def losses_fn(model, x, y):
    """The two objectives: one MSE per output, as a vector of shape (2,)."""
    pred = jax.vmap(model)(x)
    return jnp.mean((pred - y) ** 2, axis=0)


def make_step(aggregator, lr):
    value_and_update = eqxjd.filter_value_and_aggregate(losses_fn, aggregator)

    @eqx.filter_jit
    def step(model, x, y):
        out = value_and_update(model, x, y)  # the Jacobian, then UPGrad
        model = eqx.apply_updates(model, jtu.tree_map(lambda u: -lr * u, out.update))
        return model, out.losses

    return step


def save_plot(history, labels, name, title, xlabel="step"):
    """Saves one curve per column of `history` to examples/output/<name>.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    OUTPUT.mkdir(exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    for column, label in zip(np.asarray(history).T, labels):
        ax.plot(column, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    path = OUTPUT / f"{name}.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def main(steps=100, quick=False, seed=0, lr=0.1, plot=True):
    """Trains for `steps` steps; returns the losses of each step, shape (steps, 2)."""
    if quick:
        steps = min(steps, 10)
    kmodel, kx, ky = jr.split(jr.key(seed), 3)
    model = make_model(kmodel)
    x = jr.normal(kx, (16, 10))
    y = jr.normal(ky, (16, 2))
    step = make_step(eqxjd.UPGrad(), lr)
    history = []
    for i in range(steps):
        model, losses = step(model, x, y)
        history.append(losses)
        if i % max(steps // 10, 1) == 0 or i == steps - 1:
            print(
                f"step {i:4d}   loss1 {float(losses[0]):.5f}   "
                f"loss2 {float(losses[1]):.5f}"
            )
    history = np.asarray(jnp.stack(history))
    if plot:
        path = save_plot(history, ["loss1", "loss2"], "basic_usage", "UPGrad, SGD(0.1)")
        print(f"plot saved to {path}")
    return history


if __name__ == "__main__":
    main()
