"""Benchmark of every eqxjd aggregator against TorchJD 0.18.0 on the same matrices,
in the same run (when torch and torchjd are importable).

Plain script (never collected by pytest). Prints a markdown table:

    python benchmarks/bench_zoo.py                      # m in {5, 16, 32}, n = 1000
    python benchmarks/bench_zoo.py --m 5 --n 10000 --methods UPGrad NashMTL
    python benchmarks/bench_zoo.py --no-torch           # eqxjd times only

For each m, one Gaussian Jacobian J (float64, `jax_enable_x64`). eqxjd: median wall
time of a `jax.jit`-compiled call (two warm-up calls, `block_until_ready`). TorchJD:
median of the same call on a float64 torch tensor holding the same values. Stateful
aggregators (NashMTL, GradVac, PCD, ExcessMTL) carry their state from call to call
in both libraries (steady-state training-loop calls on a fixed J); their outputs are
compared on the first call from a fresh state. Random aggregators (PCGrad, Random,
GradDrop, GradVac) use a fixed `jax.random.key(0)`; their outputs are not compared
("-"). Columns: times in ms, the ratio TorchJD / eqxjd (> 1: eqxjd is faster), and the
max relative difference max|d_eqxjd - d_torchjd| / max|d_torchjd|. NashMTL and CAGrad
are solved by different solvers in the two libraries (TorchJD: cvxpy), so they only
agree to the solvers' tolerances; `tol` gives the tolerance each row is checked against.
"""

import os


# jaxlib's LAPACK (OpenBLAS) threads some factorisations; on a small shared machine
# that is much slower. One thread unless the caller says otherwise.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import platform
import statistics
import time

import jax
import numpy as np


METHODS = (
    "MGDA",
    "CAGrad",
    "AlignedMTL",
    "IMTLG",
    "Krum",
    "TrimmedMean",
    "ConFIG",
    "PCGrad",
    "Random",
    "GradDrop",
    "NashMTL",
    "GradVac",
    "FairGrad",
    "PCD",
    "ExcessMTL",
    "Mean",
    "Sum",
    "UPGrad",
    "DualProj",
)
STATEFUL = {"NashMTL", "GradVac", "PCD", "ExcessMTL"}
RANDOM = {"PCGrad", "Random", "GradDrop", "GradVac"}
# Tolerance on the max relative difference to TorchJD (loose where the solvers differ).
LOOSE = {"NashMTL": 1e-3, "CAGrad": 1e-3}
TIGHT = 1e-8


def kwargs_for(name: str, m: int) -> dict:
    return {
        "CAGrad": {"c": 0.5},
        "Krum": {"n_byzantine": 1},
        "TrimmedMean": {"trim_number": 1},
        "NashMTL": {"n_tasks": m},
        "FairGrad": {"alpha": 1.0},
    }.get(name, {})


def median_time(fn, repeats: int, budget: float) -> float:
    fn()  # warm-up (compilation / cvxpy problem construction)
    fn()
    times = []
    start = time.perf_counter()
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - start > budget and len(times) >= 3:
            break
    return 1e3 * statistics.median(times)


def rel_diff(x, y) -> float:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return float(np.max(np.abs(x - y)) / max(np.max(np.abs(y)), 1e-300))


def eqxjd_callable(agg, name: str, jac, key):
    """A zero-argument function running one jitted, blocked call, and the first output
    (from a fresh state for stateful aggregators)."""
    if name in STATEFUL:
        step = jax.jit(lambda j, s, k: agg(j, s, key=k))
        state0 = agg.init(jac)
        first, _ = step(jac, state0, key)
        holder = [state0]

        def run():
            d, holder[0] = step(jac, holder[0], key)
            d.block_until_ready()

        return run, first
    step = jax.jit(lambda j, k: agg(j, key=k))
    first = step(jac, key)
    return (lambda: step(jac, key).block_until_ready()), first


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", type=int, nargs="*", default=[5, 16, 32])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--methods", nargs="*", default=list(METHODS))
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--budget", type=float, default=0.4, help="seconds per timing")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: on a small, shared machine torch's "
        "OpenMP pool makes each small matmul wait for a busy core, ~16 ms)",
    )
    parser.add_argument("--no-torch", action="store_true")
    args = parser.parse_args()
    unknown = set(args.methods) - set(METHODS)
    if unknown:
        parser.error(f"unknown methods: {sorted(unknown)}")

    jax.config.update("jax_enable_x64", True)
    import eqxjd
    import jax.numpy as jnp

    torch = tagg = None
    skip_reason = "--no-torch"
    if not args.no_torch:
        try:
            import torch
            import torchjd.aggregation as tagg
        except ImportError as e:
            torch = tagg = None
            skip_reason = f"import failed: {e}"

    key = jax.random.key(0)
    print(f"device: {jax.devices()[0]}, {platform.processor() or platform.machine()}")
    print(
        f"jax {jax.__version__}, dtype float64, n = {args.n}, "
        f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS')}"
    )
    if torch is None:
        print(f"TorchJD skipped ({skip_reason}): eqxjd times only.\n")
        header = ["method", "m", "eqxjd ms"]
    else:
        import importlib.metadata

        torchjd_version = importlib.metadata.version("torchjd")
        print(
            f"torch {torch.__version__}, torchjd {torchjd_version}, "
            f"torch threads {args.torch_threads}\n"
        )
        torch.manual_seed(args.seed)
        torch.set_num_threads(args.torch_threads)
        header = [
            "method", "m", "eqxjd ms", "TorchJD ms", "TorchJD/eqxjd",
            "max rel diff", "tol",
        ]  # fmt: skip
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header), flush=True)

    for m in args.m:
        rng = np.random.default_rng(args.seed * 1000 + m)
        jac_np = rng.standard_normal((m, args.n))
        jac = jnp.asarray(jac_np)
        jac_t = torch.tensor(jac_np) if torch is not None else None
        for name in args.methods:
            kwargs = kwargs_for(name, m)
            row = [name, str(m)]
            try:
                agg = getattr(eqxjd, name)(**kwargs)
                run, first = eqxjd_callable(agg, name, jac, key)
                t_eqx = median_time(run, args.repeats, args.budget)
                row.append(f"{t_eqx:.3f}")
            except Exception as e:  # keep the table going
                row.append(f"error: {type(e).__name__}")
                t_eqx = first = None
            if torch is not None:
                try:
                    # Outputs: a fresh instance's first call; timing: a second instance.
                    ref = getattr(tagg, name)(**kwargs)(jac_t).detach().numpy()
                    tagg_inst = getattr(tagg, name)(**kwargs)
                    t_t = median_time(
                        lambda: tagg_inst(jac_t), args.repeats, args.budget
                    )
                    row.append(f"{t_t:.3f}")
                    row.append(f"{t_t / t_eqx:.2f}" if t_eqx else "-")
                    if name in RANDOM or first is None:
                        row += ["-", "-"]
                    else:
                        tol = LOOSE.get(name, TIGHT)
                        diff = rel_diff(first, ref)
                        flag = "" if diff <= tol else " (!)"
                        row += [f"{diff:.1e}{flag}", f"{tol:.0e}"]
                except Exception as e:
                    row += [f"error: {type(e).__name__}", "-", "-", "-"]
            print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
