"""Instance-wise risk minimisation (IWRM) through the Gramian ("autogram").

One objective per training sample, as in `examples/iwrm.py`, with the same loss
function and the same step: only the strategy changes.
`strategy=eqxjd.PerSampleGramian(chunk_size=...)` never stores the per-sample
Jacobian: it accumulates the `(B, B)` Gramian of the per-sample gradients chunk by
chunk, computes UPGrad's weights from it and returns the update
$\\nabla \\sum_i w_i \\ell_i$ as one VJP (TorchJD: `Engine(model, batch_dim=0)`,
`UPGradWeighting()(G)`, `losses.backward(weights)`). Compared with ERM (SGD on the
average loss) on the data of TorchJD's IWRM example (8 batches of 16 samples,
`Linear(10, 5) -> ReLU -> Linear(5, 1)`, SGD 0.1).
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


def make_step(method, lr, chunk_size):
    if method == "iwrm":
        # chunk_size samples' gradients alive at once (None: the whole batch).
        strategy = eqxjd.PerSampleGramian(chunk_size=chunk_size)
        value_and_update = eqxjd.filter_value_and_aggregate(
            per_sample_losses, eqxjd.UPGrad(), strategy=strategy
        )
    else:
        # The same step with `eqxjd.Mean()` is SGD on the average loss.
        value_and_update = eqxjd.filter_value_and_aggregate(
            per_sample_losses, eqxjd.Mean()
        )

    @eqx.filter_jit
    def step(model, x, y):
        out = value_and_update(model, x, y)
        model = eqx.apply_updates(model, jtu.tree_map(lambda u: -lr * u, out.update))
        return model, out.losses

    return step


def save_plot(histories, name, title, xlabel="epoch"):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    OUTPUT.mkdir(exist_ok=True)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for label, history in histories.items():
        ax.plot(np.asarray(history), label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    path = OUTPUT / f"{name}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(
    epochs=30, quick=False, seed=0, lr=0.1, batches=8, batch_size=16, chunk_size=4
):
    """Returns {"iwrm": ..., "erm": ...}: the mean training loss of each epoch."""
    if quick:
        epochs, batches, batch_size = min(epochs, 4), 2, 8
    kmodel, kx, ky = jr.split(jr.key(seed), 3)
    x = jr.normal(kx, (batches, batch_size, 10))
    y = jr.normal(ky, (batches, batch_size))
    histories = {}
    for method in ("iwrm", "erm"):
        model = make_model(kmodel)
        step = make_step(method, lr, chunk_size)
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
    path = save_plot(
        {"IWRM (autogram, UPGrad)": histories["iwrm"], "ERM (mean)": histories["erm"]},
        "iwrm_gramian",
        "Mean training loss per epoch",
    )
    print(f"plot saved to {path}")
    return histories


if __name__ == "__main__":
    main()
