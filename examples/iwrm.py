"""Instance-wise risk minimisation (IWRM) with autojac.

Every training example is an objective: the loss vector has one entry per sample of
the batch, and [`eqxjd.UPGrad`][] aggregates the per-sample gradients into an update
that does not increase any sample's loss (to first order). Compared with empirical
risk minimisation (ERM: SGD on the average loss), on the data of TorchJD's IWRM example
(8 batches of 16 samples, `Linear(10, 5) -> ReLU -> Linear(5, 1)`, SGD 0.1).
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


def make_model(key, hidden=5):
    k1, k2 = jr.split(key)
    return eqx.nn.Sequential(
        [
            eqx.nn.Linear(10, hidden, key=k1),
            eqx.nn.Lambda(jax.nn.relu),
            eqx.nn.Linear(hidden, 1, key=k2),
        ]
    )


def per_sample_losses(model, x, y):
    """One squared error per sample: shape (batch,)."""
    return (jax.vmap(model)(x)[:, 0] - y) ** 2


def make_step(method, lr):
    if method == "iwrm":
        value_and_update = eqxjd.filter_value_and_aggregate(
            per_sample_losses, eqxjd.UPGrad()
        )
    else:

        def mean_loss(model, x, y):
            losses = per_sample_losses(model, x, y)
            return jnp.mean(losses), losses

        grad_fn = eqx.filter_value_and_grad(mean_loss, has_aux=True)

        def value_and_update(model, x, y):
            (_, losses), grads = grad_fn(model, x, y)
            return eqxjd.Aggregated(
                update=grads, weights=None, state=None, losses=losses
            )

    @eqx.filter_jit
    def step(model, x, y):
        out = value_and_update(model, x, y)
        model = eqx.apply_updates(model, jtu.tree_map(lambda u: -lr * u, out.update))
        return model, out.losses

    return step


def main(epochs=30, quick=False, seed=0, lr=0.1, batches=8, batch_size=16, plot=True):
    """Returns {"iwrm": ..., "erm": ...}: the mean training loss of each epoch."""
    if quick:
        epochs, batches, batch_size = min(epochs, 4), 2, 8
    kmodel, kx, ky = jr.split(jr.key(seed), 3)
    x = jr.normal(kx, (batches, batch_size, 10))
    y = jr.normal(ky, (batches, batch_size))
    histories = {}
    for method in ("iwrm", "erm"):
        model = make_model(kmodel)
        step = make_step(method, lr)
        history = []
        for epoch in range(epochs):
            losses = []
            for b in range(batches):
                model, batch_losses = step(model, x[b], y[b])
                losses.append(batch_losses)
            history.append(float(jnp.mean(jnp.stack(losses))))
            if epoch % max(epochs // 5, 1) == 0 or epoch == epochs - 1:
                print(f"[{method}] epoch {epoch:3d}   mean loss {history[-1]:.5f}")
        histories[method] = np.asarray(history)
    if plot:
        path = save_plot(
            np.stack([histories["iwrm"], histories["erm"]], axis=1),
            ["IWRM (UPGrad)", "ERM (mean)"],
            "iwrm",
            "Mean training loss per epoch",
            xlabel="epoch",
        )
        print(f"plot saved to {path}")
    return histories


if __name__ == "__main__":
    main()
