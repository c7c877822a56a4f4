"""Multi-task learning on scikit-learn's digits: eight aggregators, each with its best
learning rate, against SGD on the average of the task losses.

Three tasks on the same 1024 training images (8x8) as `digits_iwrm.py`: the digit
(10-way cross-entropy), its parity and whether it is at least 5 (logistic losses).
An MLP trunk (64-64-64, ReLU) feeds one linear head per task. Each step has three
objectives, the batch means of the task losses (batches of 32), and every parameter,
trunk and heads, follows plain SGD along their aggregation (the full Jacobian, three
rows); Mean is thus exactly SGD on the average loss (computed as a plain gradient).
One learning-rate grid for every method, three seeds; per method, the learning rate
with the lowest mean area under the average training-loss curve is selected, then
rerun on five fresh seeds, which give the reported comparison.

    python benchmarks/experiments/digits_mtl.py            # the full sweep
    python benchmarks/experiments/digits_mtl.py --quick    # a smoke run

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


TASKS = ("digit", "parity", "at least 5")


class MultiTask(eqx.Module):
    trunk: eqx.nn.MLP
    heads: tuple[eqx.nn.Linear, eqx.nn.Linear, eqx.nn.Linear]

    def __init__(self, key, hidden=64):
        kt, k1, k2, k3 = jr.split(key, 4)
        self.trunk = eqx.nn.MLP(
            64,
            hidden,
            hidden,
            1,
            activation=jax.nn.relu,
            final_activation=jax.nn.relu,
            key=kt,
        )
        self.heads = (
            eqx.nn.Linear(hidden, 10, key=k1),
            eqx.nn.Linear(hidden, 1, key=k2),
            eqx.nn.Linear(hidden, 1, key=k3),
        )

    def __call__(self, x):  # one flattened image, (64,)
        h = self.trunk(x)
        return self.heads[0](h), self.heads[1](h)[0], self.heads[2](h)[0]


def bce(logit, target):
    return jax.nn.softplus(logit) - target * logit


def per_sample_task_losses(model, x, y):
    """The three losses of each sample, shape (B, 3)."""
    digit_logits, parity_logit, high_logit = jax.vmap(model)(x)
    ce = -jnp.take_along_axis(jax.nn.log_softmax(digit_logits), y[:, None], 1)[:, 0]
    parity = bce(parity_logit, (y % 2).astype(parity_logit.dtype))
    high = bce(high_logit, (y >= 5).astype(high_logit.dtype))
    return jnp.stack([ce, parity, high], axis=1)


def task_losses(model, x, y):
    """The objectives of a step: one batch-mean loss per task, shape (3,)."""
    return jnp.mean(per_sample_task_losses(model, x, y), axis=0)


def make_epoch(method):
    if method == "mean":
        grad_fn = eqx.filter_value_and_grad(
            lambda model, x, y: jnp.mean(task_losses(model, x, y))
        )

        def direction(model, x, y, key):
            return grad_fn(model, x, y)[1]

    else:
        step = eqxjd.filter_value_and_aggregate(
            task_losses, common.AGGREGATORS[method]()
        )

        def direction(model, x, y, key):
            return step(model, x, y, agg_key=key).update

    @eqx.filter_jit
    def epoch(model, xs, ys, keys, lr):
        params, static = eqx.partition(model, eqx.is_inexact_array)

        def body(params, batch):
            update = direction(eqx.combine(params, static), *batch)
            return jtu.tree_map(lambda p, u: p - lr * u, params, update), None

        params, _ = lax.scan(body, params, (xs, ys, keys))
        return eqx.combine(params, static)

    return epoch


@eqx.filter_jit
def evaluate(model, x, y):
    """The mean loss of each task and the accuracy of each task on a whole set."""
    losses = jnp.mean(per_sample_task_losses(model, x, y), axis=0)
    digit_logits, parity_logit, high_logit = jax.vmap(model)(x)
    accuracies = jnp.stack(
        [
            jnp.mean(jnp.argmax(digit_logits, axis=1) == y),
            jnp.mean((parity_logit > 0) == (y % 2 == 1)),
            jnp.mean((high_logit > 0) == (y >= 5)),
        ]
    )
    return losses, accuracies


_EPOCHS = {}


def run_one(method, lr, seed, *, epochs, n_train, batch_size):
    (x_train, y_train), (x_test, y_test) = common.load_digits_split(seed, n_train)
    x_train = jnp.asarray(np.reshape(x_train, (len(x_train), 64)))
    x_test = jnp.asarray(np.reshape(x_test, (len(x_test), 64)))
    y_train, y_test = jnp.asarray(y_train), jnp.asarray(y_test)
    epoch = _EPOCHS.setdefault(method, make_epoch(method))
    kmodel, kdata = jr.split(jr.key(seed))
    model = MultiTask(kmodel)
    steps = n_train // batch_size
    task_curves = [np.asarray(evaluate(model, x_train, y_train)[0]).tolist()]
    epoch_time, error = [], None
    for _ in range(epochs):
        kdata, kperm, kagg = jr.split(kdata, 3)
        order = jr.permutation(kperm, n_train)[: steps * batch_size]
        xs = jnp.reshape(x_train[order], (steps, batch_size, 64))
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
        task_curves.append(np.asarray(evaluate(model, x_train, y_train)[0]).tolist())
        if not np.all(np.isfinite(task_curves[-1])):
            break
    task_curves += [[float("nan")] * 3] * (epochs + 1 - len(task_curves))
    test_losses, test_accuracies = evaluate(model, x_test, y_test)
    return dict(
        train_loss=np.mean(task_curves, axis=1).tolist(),  # the average over tasks
        train_task_losses=task_curves,
        epoch_time=epoch_time,
        error=error,
        test_task_losses=np.asarray(test_losses).tolist(),
        test_accuracies=np.asarray(test_accuracies).tolist(),
    )


def timer(method, lr, *, epochs, n_train, batch_size):
    """A function that trains one more epoch (seed 0) and returns its duration."""
    (x_train, y_train), _ = common.load_digits_split(0, n_train)
    x_train = jnp.asarray(np.reshape(x_train, (n_train, 64)))
    y_train = jnp.asarray(y_train)
    epoch = _EPOCHS.setdefault(method, make_epoch(method))
    kmodel, kdata = jr.split(jr.key(0))
    model = MultiTask(kmodel)
    steps = n_train // batch_size
    xs = jnp.reshape(x_train[: steps * batch_size], (steps, batch_size, 64))
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
        "| method | lr | final training loss (average) | AUC | final training "
        "losses (digit / parity / ≥ 5) | test accuracy (digit / parity / ≥ 5) "
        "| time per epoch |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in methods:
        rs = common.of(runs, m, best[m])
        finals = np.asarray([r["train_task_losses"][-1] for r in rs]).mean(axis=0)
        accuracies = np.asarray([r["test_accuracies"] for r in rs]).mean(axis=0)
        lines.append(
            f"| {common.LABELS[m]} | {best[m]:g} "
            f"| {common.stats([r['train_loss'][-1] for r in rs])} "
            f"| {common.stats([common.auc(r['train_loss']) for r in rs])} "
            f"| {' / '.join(f'{v:.4f}' for v in finals)} "
            f"| {' / '.join(f'{v:.3f}' for v in accuracies)} "
            f"| {epoch_ms[m]:.0f} ms |"
        )
    return "\n".join(lines)


def main(argv=None):
    return common.run_experiment(
        "digits_mtl",
        "Multi-task digits (digit, parity, ≥ 5)",
        run_one,
        timer,
        results_table,
        "Multi-task digits: average training loss (selected learning rates, "
        "fresh seeds)",
        "average training loss",
        full=dict(epochs=20, n_train=1024, batch_size=32),
        quick=dict(epochs=2, n_train=256, batch_size=32),
        argv=argv,
    )


if __name__ == "__main__":
    main()
