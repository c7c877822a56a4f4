"""Multi-task learning with a Flax NNX model, trained with optax through
`nnx.Optimizer`.

Two tasks on scikit-learn's bundled digits (8x8 images): the digit (10-way
cross-entropy) and its parity (logistic loss), from one trunk (`Linear -> BatchNorm ->
ReLU -> Dropout`) and two heads. Every parameter follows [`eqxjd.UPGrad`][]'s
aggregation of the two losses' Jacobian; Adam is applied to that update. The same
network is also trained with [`eqxjd.Mean`][], which is Adam on the average loss.

The NNX recipe: `nnx.split(model, nnx.Param, ...)` separates the trainable
parameters (the argument the step differentiates) from everything else (BatchNorm's
statistics, the dropout RNG state), which the loss function receives as a keyword
argument and merges back; the updated statistics and RNG counts come out as `aux`
and go back into the model with `nnx.update`. Nothing is downloaded.
"""

import pathlib
import sys

import eqxjd
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
from flax import nnx


sys.path.insert(0, str(pathlib.Path(__file__).parent))
from basic_usage import save_plot  # noqa: E402


def load_data(seed=0, n_train=None):
    """Digits scaled to [0, 1], their class and parity; a 75/25 train/test split."""
    from sklearn.datasets import load_digits

    pixels, target = load_digits(return_X_y=True)
    x = pixels.astype(np.float32) / 16.0
    y = target.astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(y))
    split = (3 * len(y)) // 4
    train, test = order[:split][:n_train], order[split:]

    def arrays(i):
        return jnp.asarray(x[i]), jnp.asarray(y[i]), jnp.asarray(y[i] % 2, jnp.float32)

    return arrays(train), arrays(test)


class MultiTaskNet(nnx.Module):
    def __init__(self, hidden, *, rngs):
        self.linear = nnx.Linear(64, hidden, rngs=rngs)
        self.norm = nnx.BatchNorm(hidden, rngs=rngs)
        self.drop = nnx.Dropout(0.1, rngs=rngs)
        self.digit = nnx.Linear(hidden, 10, rngs=rngs)
        self.parity = nnx.Linear(hidden, 1, rngs=rngs)

    def __call__(self, x):
        h = self.drop(nnx.relu(self.norm(self.linear(x))))
        return self.digit(h), self.parity(h)[:, 0]


def task_losses(model, x, digit, odd):
    """The two objectives, shape (2,)."""
    digit_logits, parity_logits = model(x)
    ce = optax.softmax_cross_entropy_with_integer_labels(digit_logits, digit)
    bce = optax.sigmoid_binary_cross_entropy(parity_logits, odd)
    return jnp.stack([jnp.mean(ce), jnp.mean(bce)])


def make_train_step(aggregator):
    @nnx.jit
    def train_step(model, optimizer, x, digit, odd):
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def losses_fn(params, x, digit, odd, *, rest):
            # `copy=True`: a fresh model inside the step's trace; `rest` is not mutated.
            model = nnx.merge(graphdef, params, rest, copy=True)
            losses = task_losses(model, x, digit, odd)
            return losses, nnx.state(model, nnx.Not(nnx.Param))

        step = eqxjd.filter_value_and_aggregate(losses_fn, aggregator, has_aux=True)
        out = step(params, x, digit, odd, rest=rest)
        nnx.update(model, out.aux)  # new batch statistics and RNG counts
        optimizer.update(model, out.update)  # out.update: an nnx.State of nnx.Param
        return out.losses

    return train_step


@nnx.jit
def accuracies(model, x, digit, odd):
    digit_logits, parity_logits = model(x)
    return (
        jnp.mean(jnp.argmax(digit_logits, axis=1) == digit),
        jnp.mean((parity_logits > 0) == (odd > 0.5)),
    )


def train(aggregator, train_data, epochs, batch_size, lr, hidden, seed):
    model = MultiTaskNet(hidden, rngs=nnx.Rngs(seed))
    optimizer = nnx.Optimizer(model, optax.adam(lr), wrt=nnx.Param)
    train_step = make_train_step(aggregator)
    n = train_data[0].shape[0]
    key = jr.key(seed)
    history = []
    for _ in range(epochs):
        key, sub = jr.split(key)
        order = jr.permutation(sub, n)
        epoch_losses = []
        for start in range(0, n - batch_size + 1, batch_size):
            batch = [a[order[start : start + batch_size]] for a in train_data]
            epoch_losses.append(train_step(model, optimizer, *batch))
        history.append(np.mean(np.stack(epoch_losses), axis=0))
    return model, np.stack(history)


def main(epochs=20, quick=False, seed=0, lr=1e-2, batch_size=64, plot=True):
    """Returns {"upgrad": history, "mean": history}: the mean training losses of each
    epoch, each of shape (epochs, 2) (digit, parity)."""
    n_train, hidden = None, 64
    if quick:
        epochs, n_train, hidden = min(epochs, 3), 256, 16
    train_data, test_data = load_data(seed, n_train)
    histories = {}
    for name, aggregator in (("upgrad", eqxjd.UPGrad()), ("mean", eqxjd.Mean())):
        model, history = train(
            aggregator, train_data, epochs, batch_size, lr, hidden, seed
        )
        histories[name] = history
        model.eval()  # running statistics, no dropout
        digit_acc, parity_acc = accuracies(model, *test_data)
        print(
            f"[{name:6s}] final training losses: digit {history[-1, 0]:.4f}, "
            f"parity {history[-1, 1]:.4f}   test accuracy: digit "
            f"{float(digit_acc):.3f}, parity {float(parity_acc):.3f}"
        )
    if plot:
        path = save_plot(
            np.concatenate([histories["upgrad"], histories["mean"]], axis=1),
            ["digit (UPGrad)", "parity (UPGrad)", "digit (mean)", "parity (mean)"],
            "flax_nnx_mtl",
            "Flax NNX, digits: digit (CE) and parity (BCE)",
            xlabel="epoch",
        )
        print(f"plot saved to {path}")
    return histories


if __name__ == "__main__":
    main()
