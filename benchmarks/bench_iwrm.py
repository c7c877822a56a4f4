"""Instance-wise risk minimisation (one loss per sample): the cost of a Jacobian-descent
step against a plain SGD step of the same model and batch.

Paths, each one jitted training step (losses, update, SGD update of the parameters):

- `sgd`: `eqx.filter_value_and_grad` of the mean loss (the floor);
- `structured`: `strategy=eqxjd.PerSampleGramian()` (the per-sample Gramian from the
  activations and output cotangents of one forward and one backward pass);
- `gradients`: `strategy=eqxjd.PerSampleGramian(method="gradients", chunk_size=32)`
  (per-sample gradients, 32 samples at a time);
- `full`: `strategy=eqxjd.FullJacobian()` (the per-sample Jacobian, then UPGrad);
- `torchjd`: TorchJD's `autogram.Engine(model, batch_dim=0)` + `UPGradWeighting` +
  `losses.backward(weights)`, when a Python with torch and torchjd is given.

All JAX paths run in one process, interleaved round by round, on the same data. Time
is the median over rounds of the in-jit cost of one step; "first call" is compilation
plus the first run; memory is XLA's compiled memory analysis (temporaries and outputs,
what the step allocates besides its inputs). Ratios are to `sgd`.

    python benchmarks/bench_iwrm.py [--models mlp cnn transformer] [--batches 32 64 256]
        [--dtypes float32 float64] [--paths sgd structured gradients full]
        [--rounds 20] [--torch-python /path/to/python]
"""

import os


# Small batched LAPACK calls (the QP) slow down badly with threaded OpenBLAS, and XLA's
# default CPU schedule hands tiny ops to its thread pool.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault(
    "XLA_FLAGS", "--xla_cpu_enable_concurrency_optimized_scheduler=false"
)

import argparse
import json
import statistics
import subprocess
import sys
import time


PATHS = ("sgd", "structured", "gradients", "full")


def _models(name, key, dtype):
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import jax.random as jr

    if name == "mlp":
        model = eqx.nn.MLP(
            784, 10, 512, 2, activation=jax.nn.relu, key=key, dtype=dtype
        )

        def data(k, batch):
            kx, ky = jr.split(k)
            return jr.normal(kx, (batch, 784), dtype), jr.randint(ky, (batch,), 0, 10)

        return model, data
    if name == "cnn":

        class CNN(eqx.Module):
            conv1: eqx.nn.Conv2d
            conv2: eqx.nn.Conv2d
            linear: eqx.nn.Linear

            def __init__(self, key):
                k1, k2, k3 = jr.split(key, 3)
                self.conv1 = eqx.nn.Conv2d(1, 16, 3, padding=1, key=k1, dtype=dtype)
                self.conv2 = eqx.nn.Conv2d(16, 32, 3, padding=1, key=k2, dtype=dtype)
                self.linear = eqx.nn.Linear(32 * 7 * 7, 10, key=k3, dtype=dtype)

            def __call__(self, x):
                pool = eqx.nn.MaxPool2d(2, 2)
                x = pool(jax.nn.relu(self.conv1(x)))
                x = pool(jax.nn.relu(self.conv2(x)))
                return self.linear(jnp.ravel(x))

        def data(k, batch):
            kx, ky = jr.split(k)
            x = jr.normal(kx, (batch, 1, 28, 28), dtype)
            return x, jr.randint(ky, (batch,), 0, 10)

        return CNN(key), data
    if name == "transformer":
        vocab, length, dim, heads = 100, 16, 64, 4

        class Transformer(eqx.Module):
            embedding: eqx.nn.Embedding
            attention: eqx.nn.MultiheadAttention
            norm1: eqx.nn.LayerNorm
            norm2: eqx.nn.LayerNorm
            mlp: eqx.nn.MLP
            head: eqx.nn.Linear

            def __init__(self, key):
                k = jr.split(key, 4)
                self.embedding = eqx.nn.Embedding(vocab, dim, key=k[0], dtype=dtype)
                self.attention = eqx.nn.MultiheadAttention(
                    heads, dim, key=k[1], dtype=dtype
                )
                self.norm1 = eqx.nn.LayerNorm(dim, dtype=dtype)
                self.norm2 = eqx.nn.LayerNorm(dim, dtype=dtype)
                self.mlp = eqx.nn.MLP(dim, dim, 4 * dim, 1, key=k[2], dtype=dtype)
                self.head = eqx.nn.Linear(dim, 10, key=k[3], dtype=dtype)

            def __call__(self, tokens):
                x = jax.vmap(self.embedding)(tokens)
                x = x + self.attention(*(jax.vmap(self.norm1)(x),) * 3)
                x = x + jax.vmap(self.mlp)(jax.vmap(self.norm2)(x))
                return self.head(jnp.mean(x, axis=0))

        def data(k, batch):
            kx, ky = jr.split(k)
            tokens = jr.randint(kx, (batch, length), 0, vocab)
            return tokens, jr.randint(ky, (batch,), 0, 10)

        return Transformer(key), data
    raise ValueError(f"unknown model {name!r}")


def _steps(model, paths):
    """One jitted SGD step per path: `step(params, x, y) -> (params, mean loss)`."""
    import equinox as eqx
    import eqxjd
    import jax
    import jax.numpy as jnp
    import jax.tree_util as jtu

    params, static = eqx.partition(model, eqx.is_inexact_array)

    def losses_fn(params, x, y):
        logits = jax.vmap(eqx.combine(params, static))(x)
        picked = jnp.take_along_axis(logits, y[:, None], axis=1)[:, 0]
        return jax.nn.logsumexp(logits, axis=1) - picked

    def sgd(params, update):
        return jtu.tree_map(lambda p, u: p - 0.01 * u, params, update)

    strategies = {
        "structured": lambda: eqxjd.PerSampleGramian(),
        "gradients": lambda: eqxjd.PerSampleGramian(method="gradients", chunk_size=32),
        "full": lambda: eqxjd.FullJacobian(),
    }
    out = {}
    for path in paths:
        if path == "sgd":
            grad = eqx.filter_value_and_grad(
                lambda p, x, y: jnp.mean(losses_fn(p, x, y))
            )

            def step(params, x, y, grad=grad):
                loss, update = grad(params, x, y)
                return sgd(params, update), loss

        else:
            jd = eqxjd.filter_value_and_aggregate(
                losses_fn, eqxjd.UPGrad(), strategy=strategies[path]()
            )

            def step(params, x, y, jd=jd):
                result = jd(params, x, y)
                return sgd(params, result.update), jnp.mean(result.losses)

        out[path] = jax.jit(step)
    return params, out


def _run_jax(model_name, batch, dtype_name, paths, rounds):
    import jax

    if dtype_name == "float64":
        jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import jax.random as jr

    dtype = jnp.dtype(dtype_name)
    model, data = _models(model_name, jr.key(0), dtype)
    params, steps = _steps(model, paths)
    x, y = data(jr.key(1), batch)
    results = {}
    for path, step in steps.items():
        start = time.perf_counter()
        compiled = step.lower(params, x, y).compile()
        jax.block_until_ready(compiled(params, x, y))
        memory = compiled.memory_analysis()
        results[path] = {
            "first_call_s": time.perf_counter() - start,
            "memory_mib": (memory.temp_size_in_bytes + memory.output_size_in_bytes)
            / 2**20,
            "times": [],
            "compiled": compiled,
        }
    for _ in range(rounds):  # interleaved: every path once per round
        for path, entry in results.items():
            start = time.perf_counter()
            jax.block_until_ready(entry["compiled"](params, x, y))
            entry["times"].append(time.perf_counter() - start)
    rows = []
    for path, entry in results.items():
        rows.append(
            {
                "model": model_name,
                "batch": batch,
                "dtype": dtype_name,
                "path": path,
                "time_ms": 1e3 * statistics.median(entry["times"]),
                "first_call_s": entry["first_call_s"],
                "memory_mib": entry["memory_mib"],
            }
        )
    return rows


_TORCH_WORKER = r"""
import json, statistics, sys, time
import torch
from torch import nn
import torch.nn.functional as F
from torchjd.aggregation import UPGradWeighting
from torchjd.autogram import Engine

model_name, batch, dtype_name = sys.argv[1], int(sys.argv[2]), sys.argv[3]
rounds = int(sys.argv[4])
torch.set_num_threads(1)
dtype = getattr(torch, dtype_name)
torch.manual_seed(0)
if model_name == "mlp":
    model = nn.Sequential(
        nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
        nn.Linear(512, 10))
    x = torch.randn(batch, 784)
else:
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 7 * 7, 10))
    x = torch.randn(batch, 1, 28, 28)
model, x = model.to(dtype), x.to(dtype)
y = torch.randint(0, 10, (batch,))
optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
engine = Engine(model, batch_dim=0)
weighting = UPGradWeighting()

def step():
    optimizer.zero_grad()
    losses = F.cross_entropy(model(x), y, reduction="none")
    weights = weighting(engine.compute_gramian(losses))
    losses.backward(weights)
    optimizer.step()

start = time.perf_counter(); step(); first = time.perf_counter() - start
times = []
for _ in range(rounds):
    start = time.perf_counter(); step(); times.append(time.perf_counter() - start)
print(json.dumps({"time_ms": 1e3 * statistics.median(times), "first_call_s": first}))
"""


def _run_torch(python, model, batch, dtype, rounds):
    if model == "transformer":
        return None  # no TorchJD counterpart of the Equinox block here
    cmd = [python, "-c", _TORCH_WORKER, model, str(batch), dtype, str(rounds)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        print(proc.stderr[-3000:], file=sys.stderr)
        return None
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return dict(
        model=model, batch=batch, dtype=dtype, path="torchjd", memory_mib=0.0, **out
    )


def _print_table(rows):
    floor = {
        (r["model"], r["batch"], r["dtype"]): r for r in rows if r["path"] == "sgd"
    }
    header = (
        f"{'model':12s}{'dtype':>9s}{'batch':>6s} {'path':11s}{'ms':>9s}{'x SGD':>8s}"
        f"{'first s':>9s}{'MiB':>9s}{'x SGD':>8s}"
    )
    print(header)
    for r in rows:
        base = floor.get((r["model"], r["batch"], r["dtype"]))
        t_ratio = r["time_ms"] / base["time_ms"] if base else float("nan")
        m_ratio = r["memory_mib"] / base["memory_mib"] if base else float("nan")
        print(
            f"{r['model']:12s}{r['dtype']:>9s}{r['batch']:>6d} {r['path']:11s}"
            f"{r['time_ms']:9.2f}{t_ratio:8.1f}{r['first_call_s']:9.2f}"
            f"{r['memory_mib']:9.1f}{m_ratio:8.1f}"
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn", "transformer"])
    parser.add_argument("--batches", nargs="+", type=int, default=[32, 64, 256])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float64"])
    parser.add_argument("--paths", nargs="+", default=list(PATHS))
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--torch-python", help="a Python with torch and torchjd")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        model, batch, dtype = args.worker.split(",")
        rows = _run_jax(model, int(batch), dtype, args.paths, args.rounds)
        print(json.dumps(rows))
        return
    rows = []
    for dtype in args.dtypes:
        for model in args.models:
            for batch in args.batches:
                # One process per configuration: float64 needs its own JAX config.
                cmd = [sys.executable, __file__, "--worker", f"{model},{batch},{dtype}"]
                cmd += ["--paths", *args.paths, "--rounds", str(args.rounds)]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode:
                    print(proc.stderr[-3000:], file=sys.stderr)
                    continue
                new = json.loads(proc.stdout.strip().splitlines()[-1])
                if args.torch_python:
                    torch_row = _run_torch(
                        args.torch_python, model, batch, dtype, args.rounds
                    )
                    new += [torch_row] if torch_row else []
                rows += new
                _print_table(new)
    print()
    _print_table(rows)


if __name__ == "__main__":
    main()
