"""Instance-wise multi-task learning (IWMTL) through the Gramian.

Every (sample, task) pair is an objective: the losses have shape `(B, T)`, the
Gramian `(B T, B T)` is taken w.r.t. the shared trunk only (partial Jacobian descent
through `filter_spec`), UPGrad's weights are reshaped back to `(B, T)`, and the update
$\\nabla \\sum_{i,t} w_{it} \\ell_{it}$ covers the trunk AND the task heads (TorchJD:
`Engine(shared_module, batch_dim=0)`, `weights = UPGradWeighting()(G).reshape(B, T)`,
`losses.backward(weights)`). A trunk `Linear(10, 16) -> ReLU -> Linear(16, 8) -> ReLU`
with two `Linear(8, 1)` heads, batches of 16 samples, as in TorchJD's IWMTL example.
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
from iwrm_gramian import save_plot  # noqa: E402


class MultiTaskModel(eqx.Module):
    trunk: eqx.nn.Sequential
    heads: tuple[eqx.nn.Linear, ...]

    def __init__(self, key, tasks=2):
        k1, k2, *kheads = jr.split(key, 2 + tasks)
        self.trunk = eqx.nn.Sequential(
            [
                eqx.nn.Linear(10, 16, key=k1),
                eqx.nn.Lambda(jax.nn.relu),
                eqx.nn.Linear(16, 8, key=k2),
                eqx.nn.Lambda(jax.nn.relu),
            ]
        )
        self.heads = tuple(eqx.nn.Linear(8, 1, key=k) for k in kheads)

    def __call__(self, x):
        features = self.trunk(x)
        return jnp.concatenate([head(features) for head in self.heads])


def task_losses(model, x, y):
    """One loss per sample and task: shape (batch, T)."""
    return (jax.vmap(model)(x) - y) ** 2


def trunk_only(model):
    """A filter spec (like eqx.partition's) selecting the shared trunk."""
    spec = jtu.tree_map(lambda _: False, model)
    return eqx.tree_at(
        lambda m: m.trunk, spec, replace=jtu.tree_map(lambda _: True, model.trunk)
    )


def main(epochs=20, quick=False, seed=0, lr=0.05, batches=8, batch_size=16, tasks=2):
    """Returns the mean training loss of each task per epoch, shape (epochs, T)."""
    if quick:
        epochs, batches, batch_size = min(epochs, 4), 2, 8
    kmodel, kx, kw = jr.split(jr.key(seed), 3)
    x = jr.normal(kx, (batches, batch_size, 10))
    w = jr.normal(kw, (10, tasks))
    y = jnp.tanh(x @ w) + 0.1 * x[..., :tasks]  # (batches, B, T): related tasks
    model = MultiTaskModel(kmodel, tasks)
    value_and_update = eqxjd.filter_value_and_aggregate(
        task_losses,
        eqxjd.UPGrad(),
        strategy=eqxjd.PerSampleGramian(),
        filter_spec=trunk_only(model),
    )

    @eqx.filter_jit
    def step(model, x, y):
        out = value_and_update(model, x, y)
        model = eqx.apply_updates(model, jtu.tree_map(lambda u: -lr * u, out.update))
        return model, out

    history = []
    for epoch in range(epochs):
        losses = []
        for b in range(batches):
            model, out = step(model, x[b], y[b])
            losses.append(out.losses)
            if epoch == 0 and b == 0:
                print(f"losses {out.losses.shape}, weights {out.weights.shape}")
        history.append(np.asarray(jnp.mean(jnp.stack(losses), axis=(0, 1))))
        if epoch % max(epochs // 5, 1) == 0 or epoch == epochs - 1:
            per_task = "  ".join(
                f"task {t}: {v:.5f}" for t, v in enumerate(history[-1])
            )
            print(f"epoch {epoch:3d}   {per_task}")
    history = np.stack(history)
    path = save_plot(
        {f"task {t}": history[:, t] for t in range(tasks)},
        "iwmtl",
        "IWMTL (autogram on the trunk, UPGrad)",
    )
    print(f"plot saved to {path}")
    return history


if __name__ == "__main__":
    main()
