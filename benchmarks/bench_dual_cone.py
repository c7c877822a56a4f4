"""Benchmark of the dual-cone QP core: eqxjd's UPGrad and DualProj with every solver,
against TorchJD 0.18.0 (when torch is importable) and the time of J J^T alone.

Plain script (never collected by pytest). Prints a markdown table:

    python benchmarks/bench_dual_cone.py            # full grid (slow on 2 cores)
    python benchmarks/bench_dual_cone.py --quick    # m in {2, 5, 16, 32}, n = 1000

Columns: median wall times in ms of one call (jitted, warmed up,
`block_until_ready`), the speed ratio TorchJD / eqxjd, the eqxjd time as a multiple
of the jitted J J^T time, and the max relative error of the weights against quadprog
called directly on the same normalised and regularised Gramian (against TorchJD when
quadprog is missing). With `--in-jit`, also the cost per call inside a compiled loop
(what a jitted training step pays: no dispatch, warm caches and thread pool) and its
ratio to TorchJD. Float64 on CPU by default.
"""

import os
import sys


# jaxlib's LAPACK (OpenBLAS) threads potrf from n = 128 on; on a small shared machine
# the batched per-lane factorisations then slow down 10-100x. One thread each.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
# XLA:CPU's default concurrency-optimised schedule lets its runtime hand many tiny
# operations to its thread pool; on a 2-core VM the hand-offs cost more than the
# operations (UPGrad at m = 16: 0.25 ms per call, 0.14 ms with a memory-optimised
# schedule). Process-wide, so it must be set before JAX starts; `--xla-default`
# keeps XLA's default.
_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
if "--xla-default" not in sys.argv and "concurrency_optimized" not in os.environ.get(
    "XLA_FLAGS", ""
):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_SCHEDULER_FLAG}"

import argparse
import platform
import statistics
import time

import jax
import numpy as np


SOLVERS = ("bpp", "nesterov_pgd", "qpax")


def make_jacobian(kind: str, m: int, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "normal":
        return rng.standard_normal((m, n))
    if kind == "illcond":
        # Rank-4 (or less) plus 1e-3 noise, row norms spread over 1..100.
        rank = min(4, max(1, m - 1))
        base = rng.standard_normal((m, rank)) @ rng.standard_normal((rank, n))
        out = base + 1e-3 * rng.standard_normal((m, n))
        return out * np.logspace(0, 2, m)[:, None]
    if kind == "corr":
        # Nearly collinear rows with random signs: strong conflicts.
        direction = rng.standard_normal(n)
        signs = np.where(rng.random(m) < 0.5, 1.0, -1.0)
        return signs[:, None] * direction + 0.05 * rng.standard_normal((m, n))
    raise ValueError(kind)


def median_time(fn, repeats: int, budget: float) -> float:
    fn()  # warm-up (compilation)
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


def in_jit_time(fn, x, budget: float) -> float:
    """Milliseconds per call of `fn(x)` inside one jitted `fori_loop` (best of 5).

    Each iteration perturbs `x` by `0 * carry`, so nothing is hoisted out of the loop.
    """
    import jax.numpy as jnp

    def run(count):
        # x is an argument, not a captured constant: XLA would fold work on constants.
        @jax.jit
        def loop(x):
            def body(_, carry):
                return carry + 1e-300 * jnp.sum(fn(x + 0.0 * carry))

            return jax.lax.fori_loop(0, count, body, jnp.zeros((), x.dtype))

        loop(x).block_until_ready()
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            loop(x).block_until_ready()
            times.append(time.perf_counter() - t0)
        return 1e3 * min(times) / count

    # Size the loop so that one run takes about budget / 10.
    once = run(1)
    return run(max(1, min(1000, int(budget / 10 / max(once * 1e-3, 1e-6)))))


def quadprog_weights(jacobian: np.ndarray, method: str) -> np.ndarray | None:
    try:
        import quadprog
    except ImportError:
        return None
    m = jacobian.shape[0]
    g = jacobian @ jacobian.T
    trace = np.trace(g)
    g = np.zeros_like(g) if trace < 1e-4 else g / trace
    g = g + 1e-4 * np.eye(m)
    lanes = np.eye(m) / m if method == "upgrad" else np.full((1, m), 1 / m)
    out = [quadprog.solve_qp(g, np.zeros(m), np.eye(m), lane, 0)[0] for lane in lanes]
    return np.sum(out, axis=0)


def rel_err(x, y) -> float:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return float(np.max(np.abs(x - y)) / max(np.max(np.abs(y)), 1e-300))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--m", type=int, nargs="*", default=None)
    parser.add_argument("--n", type=int, nargs="*", default=None)
    parser.add_argument("--kinds", nargs="*", default=["normal", "illcond", "corr"])
    parser.add_argument("--methods", nargs="*", default=["upgrad", "dualproj"])
    parser.add_argument("--solvers", nargs="*", default=list(SOLVERS))
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--budget", type=float, default=2.0, help="seconds per timing")
    parser.add_argument("--qpax-max-m", type=int, default=32, help="qpax is slow")
    parser.add_argument("--float32", action="store_true")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument(
        "--xla-default",
        action="store_true",
        help=f"keep XLA's default schedule (do not set {_SCHEDULER_FLAG})",
    )
    parser.add_argument(
        "--in-jit",
        action="store_true",
        help="also time eqxjd inside a compiled loop (a training step's view)",
    )
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="torch intra-op threads (1 is fastest for TorchJD's small ops here)",
    )
    args = parser.parse_args()

    if not args.float32:
        jax.config.update("jax_enable_x64", True)
    import eqxjd
    import jax.numpy as jnp

    ms = args.m or ([2, 5, 16, 32] if args.quick else [2, 5, 16, 32, 64, 128])
    ns = args.n or ([1000] if args.quick else [1000, 10000])
    dtype = np.float32 if args.float32 else np.float64

    torch = torchjd_aggs = None
    if not args.no_torch:
        try:
            import torch
            from torchjd.aggregation import DualProj as TDualProj, UPGrad as TUPGrad

            torch.set_num_threads(args.torch_threads)

            torchjd_aggs = {"upgrad": TUPGrad(), "dualproj": TDualProj()}
        except ImportError:
            torch = None

    classes = {
        "upgrad": (eqxjd.UPGrad, eqxjd.UPGradWeighting),
        "dualproj": (eqxjd.DualProj, eqxjd.DualProjWeighting),
    }
    gram = jax.jit(eqxjd.tree_gramian)  # J J^T at full precision
    jitted = {
        (method, s): (jax.jit(agg_cls(solver=s)), jax.jit(weighting_cls(solver=s)))
        for method, (agg_cls, weighting_cls) in classes.items()
        for s in args.solvers
    }

    print(f"device: {jax.devices()[0]}, {platform.processor() or platform.machine()}")
    print(f"XLA_FLAGS: {os.environ.get('XLA_FLAGS', '').strip() or '(none)'}")
    print(f"dtype: {np.dtype(dtype).name}; torch: {'yes' if torch else 'no'}\n")
    header = ["kind", "m", "n", "method", "JJᵀ ms", "TorchJD ms", "TorchJD err"]
    for s in args.solvers:
        header += [f"{s} ms", f"{s} speedup", f"{s} ×JJᵀ", f"{s} err"]
        if args.in_jit:
            header += [f"{s} in-jit ms", f"{s} in-jit speedup"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header), flush=True)

    for kind in args.kinds:
        for n in ns:
            for m in ms:
                jac_np = make_jacobian(kind, m, n, seed=m * 1000 + n).astype(dtype)
                jac = jnp.asarray(jac_np)
                floor = median_time(
                    lambda: gram(jac).block_until_ready(), args.repeats, args.budget
                )
                gram_np = np.asarray(gram(jac), np.float64)
                if torch is not None:
                    jac_t = torch.tensor(jac_np)
                for method in args.methods:
                    reference = quadprog_weights(jac_np.astype(np.float64), method)
                    row = [kind, str(m), str(n), method, f"{floor:.3f}"]
                    t_torch = None
                    if torch is not None:
                        agg = torchjd_aggs[method]
                        t_torch = median_time(
                            lambda: agg(jac_t), args.repeats, args.budget
                        )
                        w_torch = agg.gramian_weighting(torch.tensor(gram_np)).numpy()
                        if reference is None:
                            reference = w_torch
                            err_torch = "ref"
                        else:
                            err_torch = f"{rel_err(w_torch, reference):.1e}"
                        row += [f"{t_torch:.3f}", err_torch]
                    else:
                        row += ["–", "–"]
                    for s in args.solvers:
                        if s == "qpax" and m > args.qpax_max_m:
                            row += ["–"] * (6 if args.in_jit else 4)
                            continue
                        agg, weighting = jitted[method, s]
                        t = median_time(
                            lambda: agg(jac).block_until_ready(),
                            args.repeats,
                            args.budget,
                        )
                        speedup = f"{t_torch / t:.1f}" if t_torch else "–"
                        err = "–"
                        if reference is not None:
                            w = weighting(jnp.asarray(gram_np, jac.dtype))
                            err = f"{rel_err(w, reference):.1e}"
                        row += [f"{t:.3f}", speedup, f"{t / floor:.1f}", err]
                        if args.in_jit:
                            t_jit = in_jit_time(agg, jac, args.budget)
                            ratio = f"{t_torch / t_jit:.1f}" if t_torch else "–"
                            row += [f"{t_jit:.3f}", ratio]
                    print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
