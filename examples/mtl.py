"""Multi-task learning on scikit-learn's bundled diabetes dataset.

Two tasks share a trunk: regressing the disease progression (MSE) and classifying the
patient's sex from the nine other features (logistic loss). The trunk runs once per
step; [`eqxjd.filter_mtl_value_and_aggregate`][] (TorchJD's `mtl_backward` +
`jac_to_grad`) gives the trunk the [`eqxjd.UPGrad`][] aggregation of the two tasks'
gradients and each head its own task's gradient. The same network is also trained on
the plain average of the two losses, and both tasks' test metrics are printed.

Nothing is downloaded: the dataset ships inside scikit-learn.
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


def load_data(seed=0, n=None):
    """Standardised features without `sex`, progression (standardised), sex (0/1);
    an 80/20 train/test split."""
    from sklearn.datasets import load_diabetes

    data, progression = map(np.asarray, load_diabetes(return_X_y=True))
    features = np.delete(data, 1, axis=1)
    sex = (data[:, 1] > 0).astype(np.float64)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(progression))
    if n is not None:
        order = order[:n]
    split = int(0.8 * len(order))
    train, test = order[:split], order[split:]
    mu, sd = features[train].mean(0), features[train].std(0)
    features = (features - mu) / sd
    pmu, psd = progression[train].mean(), progression[train].std()
    progression = (progression - pmu) / psd
    dtype = jnp.result_type(float)
    to = lambda a: jnp.asarray(a, dtype=dtype)
    return tuple(
        (to(features[s]), to(progression[s]), to(sex[s])) for s in (train, test)
    )


def make_networks(key, hidden=32, features=16):
    k1, k2, k3 = jr.split(key, 3)
    trunk = eqx.nn.MLP(9, features, hidden, 1, activation=jax.nn.relu, key=k1)
    heads = (eqx.nn.Linear(features, 1, key=k2), eqx.nn.Linear(features, 1, key=k3))
    return trunk, heads


def features_fn(trunk, x, progression, sex):
    return jax.nn.relu(jax.vmap(trunk)(x))


def losses_fn(heads, features, x, progression, sex):
    pred = jax.vmap(heads[0])(features)[:, 0]
    logits = jax.vmap(heads[1])(features)[:, 0]
    mse = jnp.mean((pred - progression) ** 2)
    bce = jnp.mean(jax.nn.softplus(logits) - sex * logits)
    return jnp.stack([mse, bce])


def metrics(trunk, heads, data):
    x, progression, sex = data
    features = features_fn(trunk, *data)
    pred = jax.vmap(heads[0])(features)[:, 0]
    logits = jax.vmap(heads[1])(features)[:, 0]
    mse = jnp.mean((pred - progression) ** 2)
    r2 = 1 - mse / jnp.var(progression)
    accuracy = jnp.mean((logits > 0) == (sex > 0.5))
    return float(mse), float(r2), float(accuracy)


def train(method, trunk, heads, train_data, steps, lr):
    if method == "upgrad":
        step_fn = eqxjd.filter_mtl_value_and_aggregate(
            features_fn, losses_fn, eqxjd.UPGrad()
        )

        def aggregated(trunk, heads, *data):
            out = step_fn(trunk, heads, *data)
            return out.losses, out.update

        value_and_update = aggregated
    else:

        def mean_loss(params, *data):
            trunk, heads = params
            losses = losses_fn(heads, features_fn(trunk, *data), *data)
            return jnp.mean(losses), losses

        grad_fn = eqx.filter_value_and_grad(mean_loss, has_aux=True)

        def mean_gradient(trunk, heads, *data):
            (_, losses), grads = grad_fn((trunk, heads), *data)
            return losses, grads

        value_and_update = mean_gradient

    @eqx.filter_jit
    def step(trunk, heads, *data):
        losses, update = value_and_update(trunk, heads, *data)
        trunk, heads = eqx.apply_updates(
            (trunk, heads), jtu.tree_map(lambda u: -lr * u, update)
        )
        return trunk, heads, losses

    history = []
    for i in range(steps):
        trunk, heads, losses = step(trunk, heads, *train_data)
        history.append(losses)
        if i % max(steps // 5, 1) == 0 or i == steps - 1:
            print(
                f"[{method:7s}] step {i:4d}   mse {float(losses[0]):.4f}   "
                f"bce {float(losses[1]):.4f}"
            )
    return trunk, heads, np.asarray(jnp.stack(history))


def main(steps=400, quick=False, seed=0, lr=0.1, plot=True):
    """Returns {"upgrad": history, "mean": history}, each of shape (steps, 2)."""
    n, hidden = None, 32
    if quick:
        steps, n, hidden = min(steps, 15), 120, 8
    train_data, test_data = load_data(seed, n)
    trunk0, heads0 = make_networks(jr.key(seed), hidden=hidden)
    histories = {}
    for method in ("upgrad", "mean"):
        trunk, heads, history = train(method, trunk0, heads0, train_data, steps, lr)
        histories[method] = history
        mse, r2, acc = metrics(trunk, heads, test_data)
        print(
            f"[{method:7s}] test: progression mse {mse:.4f} (R^2 {r2:.3f}), "
            f"sex accuracy {acc:.3f}"
        )
    if plot:
        path = save_plot(
            np.concatenate([histories["upgrad"], histories["mean"]], axis=1),
            ["mse (UPGrad)", "bce (UPGrad)", "mse (mean)", "bce (mean)"],
            "mtl",
            "Diabetes: progression (MSE) and sex (BCE)",
        )
        print(f"plot saved to {path}")
    return histories


if __name__ == "__main__":
    main()
