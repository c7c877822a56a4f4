"""The structured per-sample Gramian engine against a plain SGD step.

For each model and batch size, three jitted functions of the same model and batch:

- `sgd`: `eqx.filter_value_and_grad` of the mean per-sample loss (one forward, one
  backward);
- `engine`: `structured_value_and_gramian` (losses and the B x B Gramian) plus one call
  of its `vjp` (the weighted update) at weights computed from the Gramian by a cheap
  O(B^2) formula, i.e. the step without the QP (the weights depend on the Gramian, as
  in a real step, so XLA cannot overlap the update with the Gramian's backward pass);
- `iwrm`: the whole instance-wise step, `engine` with `UPGradWeighting` between the
  Gramian and the `vjp` (optional: `--iwrm`).

Printed per row: milliseconds per call (median and minimum), the ratio to `sgd` (the
median of the ratios of interleaved calls, so that a shared machine's changing load
affects both alike), the time to trace and compile (seconds), and XLA's memory
estimate of each compiled function (temporaries + outputs, MiB) with its ratio to
`sgd`'s.

Models: `mlp` (784-512-512-10, ReLU, cross-entropy), `cnn` (two 3x3 convolutions with
max pooling and a linear head on 1x28x28 images), `transformer` (an embedding, one
pre-norm block with 4-head attention and an MLP, 32 tokens of width 64, a linear head).

    python benchmarks/bench_structured_gramian.py [--models mlp cnn transformer]
        [--batches 32 64 256] [--reps 20] [--chunk-size N] [--iwrm] [--float64]
"""

import os


os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import statistics
import time


def _models(name: str, key, dtype):
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import jax.random as jr

    if name == "mlp":
        k1, k2, k3 = jr.split(key, 3)
        model = [
            eqx.nn.Linear(784, 512, key=k1, dtype=dtype),
            eqx.nn.Linear(512, 512, key=k2, dtype=dtype),
            eqx.nn.Linear(512, 10, key=k3, dtype=dtype),
        ]

        def forward(model, x):
            x = jax.nn.relu(model[0](x))
            x = jax.nn.relu(model[1](x))
            return model[2](x)

        def data(key, batch):
            kx, ky = jr.split(key)
            return jr.normal(kx, (batch, 784), dtype), jr.randint(ky, (batch,), 0, 10)

    elif name == "cnn":
        k1, k2, k3 = jr.split(key, 3)
        model = [
            eqx.nn.Conv2d(1, 16, 3, key=k1, dtype=dtype),
            eqx.nn.Conv2d(16, 32, 3, key=k2, dtype=dtype),
            eqx.nn.Linear(32 * 5 * 5, 10, key=k3, dtype=dtype),
        ]
        pool = eqx.nn.MaxPool2d(2, 2)

        def forward(model, x):
            x = pool(jax.nn.relu(model[0](x)))
            x = pool(jax.nn.relu(model[1](x)))
            return model[2](jnp.ravel(x))

        def data(key, batch):
            kx, ky = jr.split(key)
            x = jr.normal(kx, (batch, 1, 28, 28), dtype)
            return x, jr.randint(ky, (batch,), 0, 10)

    elif name == "transformer":
        vocab, width, length, heads = 100, 64, 32, 4
        ks = jr.split(key, 5)
        model = dict(
            emb=eqx.nn.Embedding(vocab, width, key=ks[0], dtype=dtype),
            ln1=eqx.nn.LayerNorm(width, dtype=dtype),
            att=eqx.nn.MultiheadAttention(heads, width, key=ks[1], dtype=dtype),
            ln2=eqx.nn.LayerNorm(width, dtype=dtype),
            mlp=eqx.nn.MLP(width, width, 4 * width, 1, key=ks[2], dtype=dtype),
            head=eqx.nn.Linear(width, vocab, key=ks[3], dtype=dtype),
        )

        def forward(model, tokens):
            x = jax.vmap(model["emb"])(tokens)
            h = jax.vmap(model["ln1"])(x)
            x = x + model["att"](h, h, h)
            x = x + jax.vmap(model["mlp"])(jax.vmap(model["ln2"])(x))
            return jnp.mean(jax.vmap(model["head"])(x), axis=0)

        def data(key, batch):
            kx, ky = jr.split(key)
            tokens = jr.randint(kx, (batch, length), 0, vocab)
            return tokens, jr.randint(ky, (batch,), 0, vocab)

    else:
        raise ValueError(f"Unknown model {name!r}; use mlp, cnn or transformer.")

    def loss_fn(model, x, y):  # batched: one cross-entropy per sample
        logits = jax.vmap(lambda xi: forward(model, xi))(x)
        logp = jax.nn.log_softmax(logits)
        return -jnp.take_along_axis(logp, y[:, None], axis=1)[:, 0]

    return model, loss_fn, data


def _times(runs, reps: int) -> list[list[float]]:
    """Milliseconds of each call, the functions interleaved: `reps` rounds of one call
    of each, after one warm-up round."""
    import jax

    for fn, args in runs:
        jax.block_until_ready(fn(*args))
    times = [[] for _ in runs]
    for _ in range(reps):
        for out, (fn, args) in zip(times, runs):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            out.append(1e3 * (time.perf_counter() - t0))
    return times


def _compile(fn, args):
    import jax

    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    seconds = time.perf_counter() - t0
    memory = compiled.memory_analysis()
    mib = float("nan")
    if memory is not None:
        mib = (memory.temp_size_in_bytes + memory.output_size_in_bytes) / 2**20
    return compiled, seconds, mib


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn", "transformer"])
    parser.add_argument("--batches", nargs="+", type=int, default=[32, 64, 256])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--chunk-size", type=int, default=None)
    parser.add_argument("--iwrm", action="store_true")
    parser.add_argument("--float64", action="store_true")
    args = parser.parse_args()

    import jax

    if args.float64:
        jax.config.update("jax_enable_x64", True)
    import equinox as eqx
    import jax.numpy as jnp
    import jax.random as jr
    from eqxjd._gramian import structured_value_and_gramian

    dtype = jnp.float64 if args.float64 else jnp.float32
    header = f"{'model':12} {'B':>4} {'what':7} {'ms':>9} {'min ms':>9} {'x sgd':>7}"
    header += f" {'compile s':>10} {'MiB':>8} {'x sgd':>7}"
    print(header)
    for name in args.models:
        model, loss_fn, data = _models(name, jr.key(0), dtype)
        diff, static = eqx.partition(model, eqx.is_inexact_array)
        for batch in args.batches:
            x, y = data(jr.key(1), batch)

            def sgd(diff, x, y):
                def mean_loss(d):
                    return jnp.mean(loss_fn(eqx.combine(d, static), x, y))

                return jax.value_and_grad(mean_loss)(diff)

            def engine(diff, x, y):
                losses, gram, vjp = structured_value_and_gramian(
                    loss_fn, diff, static, True, (x, y), chunk_size=args.chunk_size
                )
                weights = jax.nn.softmax(-jnp.sum(gram, axis=1) / jnp.trace(gram))
                return losses, vjp(weights)

            runs = [("sgd", sgd, (diff, x, y)), ("engine", engine, (diff, x, y))]
            if args.iwrm:
                from eqxjd import UPGradWeighting

                weighting = UPGradWeighting()

                def iwrm(diff, x, y):
                    losses, gram, vjp = structured_value_and_gramian(
                        loss_fn, diff, static, True, (x, y), chunk_size=args.chunk_size
                    )
                    weights = weighting(gram).astype(losses.dtype)
                    return losses, vjp(weights)

                runs.append(("iwrm", iwrm, (diff, x, y)))
            compiled = [(what, *_compile(fn, a), a) for what, fn, a in runs]
            times = _times([(c, a) for _, c, _, _, a in compiled], args.reps)
            for (what, _, seconds, mib, _), ms in zip(compiled, times):
                ratio = statistics.median(t / s for t, s in zip(ms, times[0]))
                print(
                    f"{name:12} {batch:4d} {what:7} {statistics.median(ms):9.2f} "
                    f"{min(ms):9.2f} {ratio:7.2f} {seconds:10.2f} {mib:8.2f} "
                    f"{mib / compiled[0][3]:7.2f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
