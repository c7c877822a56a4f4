"""Instance-wise risk minimisation (IWRM) on scikit-learn's digits: eight aggregators,
each with its best learning rate, against SGD on the average loss.

The setting of the JD paper's central experiment (Quinton & Rey, arXiv:2406.16232),
on data that ships with scikit-learn, so it runs offline: 1024 training images (8x8),
batches of 32, one cross-entropy per image as the objectives of each step, plain SGD
along the aggregation, a small CNN. Every method is run with every learning rate of
one grid, on three seeds; per method, the learning rate with the lowest mean area
under the training-loss curve is selected, then rerun on five fresh seeds, which give
the reported comparison.

The JD methods run through `eqxjd.PerSampleGramian()` (exact; on this CNN about ten
times faster than the full Jacobian on CPU). Mean is SGD on the average loss,
computed as a plain gradient, so that its time per epoch is that of SGD.

    python benchmarks/experiments/digits_iwrm.py            # the full sweep
    python benchmarks/experiments/digits_iwrm.py --quick    # a smoke run

Rerunning skips the finished runs (see `--out`).
"""

import pathlib
import sys
import time

import equinox as eqx
import eqxjd
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np


sys.path.insert(0, str(pathlib.Path(__file__).parent))
import _common as common  # noqa: E402


# PCGrad sums the projected gradients of the 32 samples where the other methods
# average them (or take a convex combination), so its useful learning rates lie below
# the common grid: two more decades for it.
EXTRA_LEARNING_RATES = {"pcgrad": (1e-5, 3e-5, 1e-4, 3e-4)}


class CNN(eqx.Module):
    conv1: eqx.nn.Conv2d
    conv2: eqx.nn.Conv2d
    linear: eqx.nn.Linear

    def __init__(self, key):
        k1, k2, k3 = jr.split(key, 3)
        self.conv1 = eqx.nn.Conv2d(1, 8, 3, padding=1, key=k1)
        self.conv2 = eqx.nn.Conv2d(8, 16, 3, padding=1, key=k2)
        self.linear = eqx.nn.Linear(16 * 2 * 2, 10, key=k3)

    def __call__(self, x):  # one image, (1, 8, 8)
        pool = eqx.nn.MaxPool2d(2, 2)
        x = pool(jax.nn.relu(self.conv1(x)))  # (8, 4, 4)
        x = pool(jax.nn.relu(self.conv2(x)))  # (16, 2, 2)
        return self.linear(jnp.reshape(x, (-1,)))


def per_sample_losses(model, x, y):
    """One cross-entropy per image: shape (B,)."""
    log_p = jax.nn.log_softmax(jax.vmap(model)(x))
    return -jnp.take_along_axis(log_p, y[:, None], axis=1)[:, 0]


def make_epoch(method):
    """A compiled epoch of SGD steps along `method`'s update (a `lax.scan` over the
    batches); the learning rate is an argument, so one compilation serves the
    sweep."""
    if method == "mean":

        def mean_loss(model, x, y):
            losses = per_sample_losses(model, x, y)
            return jnp.mean(losses), losses

        grad_fn = eqx.filter_value_and_grad(mean_loss, has_aux=True)

        def direction(model, x, y, key):
            (_, losses), grads = grad_fn(model, x, y)
            return grads, losses

    else:
        step = eqxjd.filter_value_and_aggregate(
            per_sample_losses,
            common.AGGREGATORS[method](),
            strategy=eqxjd.PerSampleGramian(),
        )

        def direction(model, x, y, key):
            out = step(model, x, y, agg_key=key)  # the key: Random and PCGrad
            return out.update, out.losses

    @eqx.filter_jit
    def epoch(model, xs, ys, keys, lr):
        params, static = eqx.partition(model, eqx.is_inexact_array)

        def body(params, batch):
            update, _ = direction(eqx.combine(params, static), *batch)
            return jtu.tree_map(lambda p, u: p - lr * u, params, update), None

        params, _ = lax.scan(body, params, (xs, ys, keys))
        return eqx.combine(params, static)

    return epoch


@eqx.filter_jit
def evaluate(model, x, y):
    """The mean loss and the accuracy on a whole set."""
    logits = jax.vmap(model)(x)
    log_p = jax.nn.log_softmax(logits)
    loss = -jnp.mean(jnp.take_along_axis(log_p, y[:, None], axis=1))
    return loss, jnp.mean(jnp.argmax(logits, axis=1) == y)


_EPOCHS = {}  # one compiled epoch per method and process


def run_one(method, lr, seed, *, epochs, n_train, batch_size):
    (x_train, y_train), (x_test, y_test) = common.load_digits_split(seed, n_train)
    x_train, x_test = jnp.asarray(x_train[:, None]), jnp.asarray(x_test[:, None])
    y_train, y_test = jnp.asarray(y_train), jnp.asarray(y_test)
    epoch = _EPOCHS.setdefault(method, make_epoch(method))
    kmodel, kdata = jr.split(jr.key(seed))
    model = CNN(kmodel)
    steps = n_train // batch_size
    train_loss = [float(evaluate(model, x_train, y_train)[0])]
    epoch_time, error = [], None
    for _ in range(epochs):
        # Same batches and aggregator keys for every method and learning rate.
        kdata, kperm, kagg = jr.split(kdata, 3)
        order = jr.permutation(kperm, n_train)[: steps * batch_size]
        xs = jnp.reshape(x_train[order], (steps, batch_size, 1, 8, 8))
        ys = jnp.reshape(y_train[order], (steps, batch_size))
        keys = jr.split(kagg, steps)
        start = time.perf_counter()
        try:
            model = jax.block_until_ready(epoch(model, xs, ys, keys, jnp.float32(lr)))
        except eqx.EquinoxRuntimeError as e:
            # A failed solve (eqxjd's run-time checks): recorded, scored as divergence.
            error = common.error_message(e)
            break
        epoch_time.append(time.perf_counter() - start)
        train_loss.append(float(evaluate(model, x_train, y_train)[0]))
        if not np.isfinite(train_loss[-1]):
            break  # diverged: the remaining epochs are NaN
    train_loss += [float("nan")] * (epochs + 1 - len(train_loss))
    test_loss, test_accuracy = evaluate(model, x_test, y_test)
    return dict(
        train_loss=train_loss,
        epoch_time=epoch_time,
        error=error,
        test_loss=float(test_loss),
        test_accuracy=float(test_accuracy),
    )


def timer(method, lr, *, epochs, n_train, batch_size):
    """A function that trains one more epoch (seed 0) and returns its duration."""
    (x_train, y_train), _ = common.load_digits_split(0, n_train)
    x_train = jnp.asarray(x_train[:, None])
    y_train = jnp.asarray(y_train)
    epoch = _EPOCHS.setdefault(method, make_epoch(method))
    kmodel, kdata = jr.split(jr.key(0))
    model = CNN(kmodel)
    steps = n_train // batch_size
    xs = jnp.reshape(x_train[: steps * batch_size], (steps, batch_size, 1, 8, 8))
    ys = jnp.reshape(y_train[: steps * batch_size], (steps, batch_size))
    keys = jr.split(kdata, steps)

    def one_epoch():
        nonlocal model
        start = time.perf_counter()
        model = jax.block_until_ready(epoch(model, xs, ys, keys, jnp.float32(lr)))
        return time.perf_counter() - start

    return one_epoch


def results_table(runs, best, methods, epoch_ms) -> str:
    lines = [
        "| method | lr | final training loss | training-loss AUC | test accuracy "
        "| time per epoch |",
        "|---|---|---|---|---|---|",
    ]
    for m in methods:
        rs = common.of(runs, m, best[m])
        lines.append(
            f"| {common.LABELS[m]} | {best[m]:g} "
            f"| {common.stats([r['train_loss'][-1] for r in rs])} "
            f"| {common.stats([common.auc(r['train_loss']) for r in rs])} "
            f"| {common.stats([r['test_accuracy'] for r in rs])} "
            f"| {epoch_ms[m]:.0f} ms |"
        )
    return "\n".join(lines)


def main(argv=None):
    return common.run_experiment(
        "digits_iwrm",
        "IWRM on digits",
        run_one,
        timer,
        results_table,
        "IWRM on digits: training loss (selected learning rates, fresh seeds)",
        "training loss",
        full=dict(epochs=20, n_train=1024, batch_size=32),
        quick=dict(epochs=2, n_train=256, batch_size=32),
        extra_lrs=EXTRA_LEARNING_RATES,
        argv=argv,
    )


if __name__ == "__main__":
    main()
