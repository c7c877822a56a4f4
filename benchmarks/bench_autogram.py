"""Peak memory and time: the Gramian path vs the full-Jacobian path vs TorchJD's Engine.

Instance-wise risk minimisation (one loss per sample) with UPGrad on an MLP
784 -> 1024 -> 512 -> 10 (1,333,770 parameters, float32, CPU), at batch 64, 256, 1024:

- `gramian`: `eqxjd.filter_value_and_aggregate(losses, eqxjd.UPGrad(),
  strategy=eqxjd.PerSampleGramian(method="gradients", chunk_size=32))`: per-sample
  gradients of 32 samples at a time, G's entries from JVPs in their directions (dense
  model: the forward strategy), the update as one VJP. The (B, n) Jacobian is never
  formed.
- `full_jac`: the per-sample Jacobian (B, n) from `jax.vmap(jax.grad(...))`, then
  `eqxjd.aggregate(eqxjd.UPGrad(), J)` (the autojac path).
- `torchjd`: `torchjd.autogram.Engine(model, batch_dim=0)`, `UPGradWeighting()(G)`,
  `losses.backward(w)` (TorchJD 0.18), run with the torch interpreter if one is found.

`BENCH_CHEAP=1` swaps UPGrad for a cheap O(m^2) weighting that reads G (isolates
the weighting's own memory).

Memory: for JAX, XLA's compiled memory analysis of the jitted step (temp + output
bytes: what the step allocates besides its inputs); for every path, the peak resident
set size (ru_maxrss) of a fresh subprocess running only that configuration, minus the
RSS after imports and data creation. Time: median wall time of `--reps` jitted calls
after one warm-up call.

    python benchmarks/bench_autogram.py [--batches 64 256 1024] [--reps 3]
        [--torch-python PYTHON]

`--torch-python` names a Python interpreter that has torch and torchjd (default: this
one, if it has them).
"""

import os


# jaxlib's LAPACK (OpenBLAS) threads potrf from n = 128 on; UPGrad's per-lane
# factorisations at m >= 128 then slow down 10-100x on a small machine. One thread.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from typing import ClassVar


SIZES = (784, 1024, 512, 10)
CHUNK = 32


def _rss_mib() -> float:
    # Current RSS from /proc (Linux); ru_maxrss is the peak.
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _jax_worker(path: str, batch: int, reps: int, run: bool) -> dict:
    import equinox as eqx
    import eqxjd
    import jax
    import jax.numpy as jnp
    import jax.random as jr

    key = jr.key(0)
    kmodel, kx, ky = jr.split(key, 3)
    model = eqx.nn.MLP(SIZES[0], SIZES[-1], SIZES[1], 2, key=kmodel)
    model = eqx.tree_at(
        lambda m: m.layers[1],
        model,
        eqx.nn.Linear(SIZES[1], SIZES[2], key=jr.fold_in(kmodel, 1)),
    )
    model = eqx.tree_at(
        lambda m: m.layers[2],
        model,
        eqx.nn.Linear(SIZES[2], SIZES[3], key=jr.fold_in(kmodel, 2)),
    )
    n = sum(x.size for x in jax.tree_util.tree_leaves(eqx.filter(model, eqx.is_array)))
    x = jr.normal(kx, (batch, SIZES[0]))
    y = jr.randint(ky, (batch,), 0, SIZES[-1])

    def sample_loss(model, x, y):
        logits = model(x)
        return jax.nn.logsumexp(logits) - logits[y]

    class _CheapWeighting(eqxjd.AbstractWeighting):
        # Reads G (so XLA cannot drop its computation) at O(m^2) cost.
        reads: ClassVar[str] = "gramian"
        differentiable: ClassVar[bool] = False

        def __call__(self, stat, /, *, key=None):
            scores = stat @ jnp.ones(stat.shape[0], stat.dtype) / jnp.trace(stat)
            return jax.nn.softmax(-scores)

    cheap = os.environ.get("BENCH_CHEAP")
    weighting = _CheapWeighting() if cheap else eqxjd.UPGradWeighting()
    aggregator = eqxjd.WeightedAggregator(weighting)
    if path == "gramian":
        per_sample_losses = jax.vmap(sample_loss, in_axes=(None, 0, 0))
        value_and_aggregate = eqxjd.filter_value_and_aggregate(
            per_sample_losses,
            aggregator,
            strategy=eqxjd.PerSampleGramian(method="gradients", chunk_size=CHUNK),
        )

        def step_(model, x, y):
            out = value_and_aggregate(model, x, y)
            return out.update, out.weights

    else:

        def step_(model, x, y):
            grads = jax.vmap(eqx.filter_grad(sample_loss), in_axes=(None, 0, 0))(
                model, x, y
            )
            return eqxjd.aggregate(aggregator, grads).update, None

    params, static = eqx.partition(model, eqx.is_array)
    step = jax.jit(lambda p, x, y: step_(eqx.combine(p, static), x, y))
    model = params
    compiled = step.lower(model, x, y).compile()
    mem = compiled.memory_analysis()
    out = {
        "path": path,
        "batch": batch,
        "params": int(n),
        "temp_mib": mem.temp_size_in_bytes / 2**20,
        "output_mib": mem.output_size_in_bytes / 2**20,
        "xla_peak_mib": (mem.temp_size_in_bytes + mem.output_size_in_bytes) / 2**20,
    }
    if run:
        base = _rss_mib()
        jax.block_until_ready(step(model, x, y))
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            jax.block_until_ready(step(model, x, y))
            times.append(time.perf_counter() - t)
        out["time_s"] = statistics.median(times)
        out["rss_peak_mib"] = _peak_mib() - base
    return out


def _torch_worker(batch: int, reps: int) -> dict:
    import torch
    from torch import nn
    from torchjd.aggregation import UPGradWeighting
    from torchjd.autogram import Engine

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(SIZES[0], SIZES[1]),
        nn.ReLU(),
        nn.Linear(SIZES[1], SIZES[2]),
        nn.ReLU(),
        nn.Linear(SIZES[2], SIZES[3]),
    )
    x = torch.randn(batch, SIZES[0])
    y = torch.randint(0, SIZES[-1], (batch,))
    engine = Engine(model, batch_dim=0)
    weighting = UPGradWeighting()
    criterion = nn.CrossEntropyLoss(reduction="none")

    def step():
        model.zero_grad()
        losses = criterion(model(x), y)
        gramian = engine.compute_gramian(losses)
        losses.backward(weighting(gramian))

    base = _rss_mib()
    step()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return {
        "path": "torchjd",
        "batch": batch,
        "params": sum(p.numel() for p in model.parameters()),
        "time_s": statistics.median(times),
        "rss_peak_mib": _peak_mib() - base,
        "threads": torch.get_num_threads(),
    }


def _subprocess(python: str, args: list[str]) -> dict | None:
    proc = subprocess.run(
        [python, __file__, *args], capture_output=True, text=True, timeout=900
    )
    if proc.returncode != 0:
        print(proc.stderr[-2000:], file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _torch_python(explicit: str | None) -> str | None:
    for python in [explicit or sys.executable]:
        if python and os.path.exists(python):
            check = subprocess.run(
                [python, "-c", "import torch, torchjd"], capture_output=True
            )
            if check.returncode == 0:
                return python
    return None


def main(batches=(64, 256, 1024), reps=3, torch_python=None, max_full_run=256):
    rows = []
    for batch in batches:
        for path in ("gramian", "full_jac"):
            # The full-Jacobian step at B=1024 needs ~5 GiB: only its memory analysis.
            run = path == "gramian" or batch <= max_full_run
            args = ["--worker", path, "--batch", str(batch), "--reps", str(reps)]
            row = _subprocess(sys.executable, args + ([] if run else ["--no-run"]))
            if row:
                rows.append(row)
                print(json.dumps(row), flush=True)
    python = _torch_python(torch_python)
    if python is None:
        print("torch/torchjd not found: skipping TorchJD's Engine.")
    else:
        for batch in batches:
            args = ["--worker", "torchjd", "--batch", str(batch), "--reps", str(reps)]
            row = _subprocess(python, args)
            if row:
                rows.append(row)
                print(json.dumps(row), flush=True)
    print()
    print(
        f"{'path':10s} {'batch':>5s} {'XLA temp+out MiB':>17s} {'RSS peak MiB':>13s} "
        f"{'time s':>8s}"
    )
    for row in rows:
        xla = row.get("xla_peak_mib")
        print(
            f"{row['path']:10s} {row['batch']:5d} "
            f"{'-' if xla is None else f'{xla:.1f}':>17s} "
            f"{row.get('rss_peak_mib', float('nan')):13.1f} "
            f"{row.get('time_s', float('nan')):8.3f}"
        )
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", choices=("gramian", "full_jac", "torchjd"))
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--no-run", action="store_true")
    parser.add_argument("--torch-python", default=None)
    args = parser.parse_args()
    if args.worker == "torchjd":
        print(json.dumps(_torch_worker(args.batch, args.reps)))
    elif args.worker:
        print(
            json.dumps(_jax_worker(args.worker, args.batch, args.reps, not args.no_run))
        )
    else:
        main(tuple(args.batches), args.reps, args.torch_python)
