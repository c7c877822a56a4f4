"""Instance-wise risk minimisation (IWRM) with a Flax Linen model, through the
per-sample Gramian, trained with optax.

One objective per training image of scikit-learn's bundled digits (8x8): a small
Linen CNN with dropout, [`eqxjd.UPGrad`][] over the per-sample cross-entropies of
each batch, computed with `strategy=eqxjd.PerSampleGramian()` (the per-sample
Jacobian is never stored), and SGD from optax. The same network is also trained with
[`eqxjd.Mean`][], which is SGD on the average loss (ERM), on the same batches.

The Linen recipe: the step differentiates its first argument, the `params`
collection; the other collections (`batch_stats`, ...; none in this model) go through
the loss function as a keyword argument, shared by all samples. Dropout draws each
sample's mask from its own key, passed as a batched argument, so that a sample's loss
does not depend on the batch it is in, which the per-sample Gramian requires.
Nothing is downloaded.
"""

import pathlib
import sys
from typing import cast

import equinox as eqx
import eqxjd
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
from flax import linen as nn


sys.path.insert(0, str(pathlib.Path(__file__).parent))
from basic_usage import save_plot  # noqa: E402


def load_data(seed=0, n_train=1024):
    """Digits as (8, 8, 1) images in [0, 1] and their class; `n_train` training
    images, the rest for testing."""
    from sklearn.datasets import load_digits

    pixels, target = load_digits(return_X_y=True)
    x = pixels.reshape(-1, 8, 8, 1).astype(np.float32) / 16.0
    y = target.astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(y))
    train, test = order[:n_train], order[n_train:]
    return (jnp.asarray(x[train]), jnp.asarray(y[train])), (
        jnp.asarray(x[test]),
        jnp.asarray(y[test]),
    )


class CNN(nn.Module):
    channels: int = 8

    @nn.compact
    def __call__(self, x, *, train=False):
        x = nn.relu(nn.Conv(self.channels, (3, 3))(x))  # (B, 8, 8, c)
        x = nn.max_pool(x, (2, 2), strides=(2, 2))  # (B, 4, 4, c)
        x = nn.relu(nn.Conv(2 * self.channels, (3, 3))(x))
        x = jnp.reshape(x, (x.shape[0], -1))
        x = nn.Dropout(0.2, deterministic=not train)(x)
        return nn.Dense(10)(x)


def make_losses(model):
    def per_sample_losses(params, x, labels, keys, *, rest):
        """One cross-entropy per sample: shape (B,)."""
        variables = {"params": params, **rest}

        def logits_of(xi, key):  # one sample, its own dropout key
            logits = model.apply(variables, xi[None], train=True, rngs={"dropout": key})
            return logits[0]

        logits = jax.vmap(logits_of)(x, keys)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels)

    return per_sample_losses


def make_train_step(model, aggregator, strategy, optimizer, rest):
    step = eqxjd.filter_value_and_aggregate(
        make_losses(model), aggregator, strategy=strategy
    )

    @eqx.filter_jit
    def train_step(params, opt_state, x, labels, key):
        keys = jr.split(key, x.shape[0])  # one dropout key per sample
        out = step(params, x, labels, keys, rest=rest)
        updates, opt_state = optimizer.update(out.update, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, jnp.mean(out.losses)

    return train_step


def main(
    epochs=15, quick=False, seed=0, lr=0.1, batch_size=32, n_train=1024, plot=True
):
    """Returns {"iwrm": ..., "erm": ...}: the mean training loss of each epoch."""
    channels = 8
    if quick:
        epochs, n_train, channels = min(epochs, 3), 128, 4
    train_data, (x_test, y_test) = load_data(seed, n_train)
    model = CNN(channels)
    variables = model.init(jr.key(seed), train_data[0][:1])
    params = variables["params"]
    rest = {k: v for k, v in variables.items() if k != "params"}  # batch_stats, ...
    methods = {
        # Exact for any sample-independent loss; never stores the (B, n) Jacobian.
        "iwrm": (eqxjd.UPGrad(), eqxjd.PerSampleGramian()),
        "erm": (eqxjd.Mean(), eqxjd.FullJacobian()),
    }
    histories = {}
    for name, (aggregator, strategy) in methods.items():
        optimizer = optax.sgd(lr)
        train_step = make_train_step(model, aggregator, strategy, optimizer, rest)
        p, opt_state = params, optimizer.init(params)
        key = jr.key(seed + 1)  # the same batches and dropout masks for both
        history = []
        for epoch in range(epochs):
            key, kperm = jr.split(key)
            order = jr.permutation(kperm, n_train)
            losses = []
            for start in range(0, n_train - batch_size + 1, batch_size):
                key, kdrop = jr.split(key)
                i = order[start : start + batch_size]
                p, opt_state, loss = train_step(
                    p, opt_state, train_data[0][i], train_data[1][i], kdrop
                )
                losses.append(loss)
            history.append(float(jnp.mean(jnp.stack(losses))))
            if epoch % max(epochs // 5, 1) == 0 or epoch == epochs - 1:
                print(f"[{name}] epoch {epoch:3d}   mean loss {history[-1]:.5f}")
        trained: dict = {"params": p, **rest}
        logits = cast(jax.Array, model.apply(trained, x_test))
        accuracy = float(jnp.mean(jnp.argmax(logits, axis=1) == y_test))
        print(f"[{name}] test accuracy {accuracy:.3f}")
        histories[name] = np.asarray(history)
    if plot:
        path = save_plot(
            np.stack([histories["iwrm"], histories["erm"]], axis=1),
            ["IWRM (UPGrad, per-sample Gramian)", "ERM (mean)"],
            "flax_linen_iwrm",
            "Flax Linen CNN, digits: mean training loss",
            xlabel="epoch",
        )
        print(f"plot saved to {path}")
    return histories


if __name__ == "__main__":
    main()
