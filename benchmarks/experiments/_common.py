"""What the digits experiments share: the data, the aggregators, a resumable sweep
with a progress bar, learning-rate selection, the results table and the plots.

Every run (method, learning rate, seed) is saved as one JSON file as soon as it
finishes; a rerun loads the finished runs and computes only the others. Files are
written atomically, so an interrupted sweep leaves no half-written run.
"""

import argparse
import json
import math
import os
import pathlib
import platform
import sys
import time
from collections.abc import Callable

import eqxjd
import jax
import numpy as np


ROOT = pathlib.Path(__file__).resolve().parent.parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "experiments"

# One constructor per method; "mean" is SGD on the average loss.
AGGREGATORS: dict[str, Callable] = {
    "upgrad": eqxjd.UPGrad,
    "mean": eqxjd.Mean,
    "mgda": eqxjd.MGDA,
    "dualproj": eqxjd.DualProj,
    "imtlg": eqxjd.IMTLG,
    "aligned_mtl": eqxjd.AlignedMTL,
    "random": eqxjd.Random,
    "pcgrad": eqxjd.PCGrad,
}
LABELS = {
    "upgrad": "UPGrad",
    "mean": "Mean (SGD)",
    "mgda": "MGDA",
    "dualproj": "DualProj",
    "imtlg": "IMTL-G",
    "aligned_mtl": "Aligned-MTL",
    "random": "Random",
    "pcgrad": "PCGrad",
}
# One grid for every method (half-decades), so that no method gets a hand-picked one.
LEARNING_RATES = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0)
SEEDS = (0, 1, 2)
# Seeds not used to select the learning rates: the reported comparison.
FRESH_SEEDS = (3, 4, 5, 6, 7)


def load_digits_split(seed: int, n_train: int):
    """scikit-learn's digits (shipped with the package): images in [0, 1] of shape
    (1797, 8, 8) and labels; a random `n_train` for training (per seed), the rest for
    testing."""
    from sklearn.datasets import load_digits

    pixels, target = load_digits(return_X_y=True)
    x = pixels.reshape(-1, 8, 8).astype(np.float32) / 16.0
    y = target.astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(y))
    train, test = order[:n_train], order[n_train:]
    return (x[train], y[train]), (x[test], y[test])


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="a smoke run (< 2 minutes)")
    p.add_argument("--methods", nargs="+", choices=sorted(AGGREGATORS))
    p.add_argument("--lrs", nargs="+", type=float)
    p.add_argument("--seeds", nargs="+", type=int)
    p.add_argument("--epochs", type=int)
    p.add_argument("--out", type=pathlib.Path, help="results folder")
    p.add_argument("--figures", type=pathlib.Path, help="where to save the plots")
    return p


def run_name(method: str, lr: float, seed: int) -> str:
    return f"{method}_lr{lr:g}_seed{seed}"


def _write_json(path: pathlib.Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)  # atomic: a run file is complete or absent


def _progress(total: int, desc: str):
    try:
        from tqdm import tqdm
    except ImportError:  # optional: plain lines instead
        return None
    return tqdm(total=total, desc=desc, unit="run", dynamic_ncols=True)


def make_grid(methods, lrs, seeds, extra_lrs=None) -> list[tuple[str, float, int]]:
    """Every (method, lr, seed); `extra_lrs[method]` adds learning rates to one
    method."""
    extra_lrs = extra_lrs or {}
    return [
        (m, lr, s)
        for m in methods
        for lr in sorted({*lrs, *extra_lrs.get(m, ())})
        for s in seeds
    ]


def sweep(
    name: str,
    run_one: Callable[[str, float, int], dict],
    config: dict,
    grid: list[tuple[str, float, int]],
    out: pathlib.Path,
) -> list[dict]:
    """Runs every (method, lr, seed) of `grid` not already saved in `out/runs` with
    the same `config`; returns all runs of the grid."""
    runs_dir = out / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    _write_json(out / "config.json", config)
    results, pending = {}, []
    for key in grid:
        path = runs_dir / f"{run_name(*key)}.json"
        if path.exists():
            saved = json.loads(path.read_text())
            if saved.get("config") == config:
                results[key] = saved
                continue
        pending.append(key)
    print(
        f"[{name}] {len(grid)} runs in the grid: {len(results)} finished, "
        f"{len(pending)} to run; results in {out}",
        flush=True,
    )
    bar = _progress(len(pending), name) if pending else None
    start = time.perf_counter()
    for i, key in enumerate(pending):
        if bar is not None:
            bar.set_postfix_str(run_name(*key))
        run = run_one(*key)
        run.update(method=key[0], lr=key[1], seed=key[2], config=config)
        _write_json(runs_dir / f"{run_name(*key)}.json", run)
        results[key] = run
        if bar is not None:
            bar.update()
        else:
            elapsed = time.perf_counter() - start
            print(
                f"  [{i + 1}/{len(pending)}] {run_name(*key)}: final train loss "
                f"{run['train_loss'][-1]:.4g} ({elapsed:.0f} s so far)",
                flush=True,
            )
    if bar is not None:
        bar.close()
    return [results[key] for key in grid]


def run_experiment(
    name: str,
    description: str,
    run_one: Callable[..., dict],
    timer: Callable[..., Callable[[], float]],
    results_table: Callable,
    plot_title: str,
    plot_ylabel: str,
    full: dict,
    quick: dict,
    extra_lrs: dict[str, tuple[float, ...]] | None = None,
    argv=None,
):
    """The command line of both experiments: the sweep on the selection seeds, the
    selected learning rates rerun on fresh seeds, the timing, the summary and the
    plot (from the fresh seeds)."""
    args = parser(description).parse_args(argv)
    methods = args.methods or list(AGGREGATORS)
    lrs, seeds, fresh = args.lrs or LEARNING_RATES, args.seeds or SEEDS, FRESH_SEEDS
    config, plot_name = dict(full), name
    if args.quick:
        # A deterministic JD method, the baseline and a random one; no fresh seeds.
        methods = args.methods or ["upgrad", "mean", "random"]
        lrs, seeds, fresh = args.lrs or (0.1,), args.seeds or (0,), ()
        config = dict(quick)
        name += "_quick"
    if args.epochs:
        config["epochs"] = args.epochs
    out = args.out or RESULTS / name
    figures = args.figures or out
    start = time.perf_counter()

    def run(m, lr, s):
        return run_one(m, lr, s, **config)

    extra = None if args.quick or args.lrs else extra_lrs
    runs = sweep(name, run, config, make_grid(methods, lrs, seeds, extra), out)
    best = select(runs)
    fresh_grid = [(m, best[m], s) for m in methods for s in fresh]
    fresh_runs = sweep(f"{name}, fresh seeds", run, config, fresh_grid, out)
    epoch_ms = time_epochs(
        lambda m, lr: timer(m, lr, **config),
        best,
        methods,
        out,
        rounds=2 if args.quick else 20,
    )
    setting = (
        f"{config['n_train']} training images, batches of {config['batch_size']}, "
        f"{config['epochs']} epochs"
    )
    parts = [
        f"{description} ({setting}).",
        "Learning rates selected on seeds "
        f"{', '.join(map(str, seeds))}: per method, the lowest mean AUC.",
    ]
    if fresh_runs:
        parts += [
            f"At the selected learning rates, on seeds {', '.join(map(str, fresh))} "
            "(not used for the selection; mean ± std over seeds):",
            results_table(fresh_runs, best, methods, epoch_ms),
        ]
    parts += [
        f"On the selection seeds {', '.join(map(str, seeds))}:",
        results_table(runs, best, methods, epoch_ms),
        "Mean AUC on the selection seeds for every learning rate (bold: selected):",
        sweep_table(runs, methods),
        f"`{command()}`; {environment()}.",
    ]
    summary = "\n\n".join(parts)
    (out / "summary.md").write_text(summary + "\n")
    print(summary)
    path = plot_curves(
        fresh_runs or runs,
        best,
        methods,
        epoch_ms,
        figures / f"{plot_name}.png",
        plot_title,
        ylabel=plot_ylabel,
    )
    print(f"\nplot saved to {path}; this call took {time.perf_counter() - start:.0f} s")
    return runs, fresh_runs, best


def error_message(e: Exception) -> str:
    """The message of an `eqx.EquinoxRuntimeError`, without the stack and the help
    text around it."""
    text = str(e).split("-------------------")[0].strip()
    return text.splitlines()[-1] if text else type(e).__name__


# ----------------------------------------------------------------------- analysis


def auc(curve) -> float:
    """The area under a training-loss curve sampled once per epoch (epoch 0 is the
    initial model), per epoch: the trapezoidal mean. Infinite if the run diverged."""
    curve = np.asarray(curve, dtype=np.float64)
    if not np.all(np.isfinite(curve)):
        return math.inf
    return float(np.trapezoid(curve) / (len(curve) - 1))


def select(runs: list[dict], curve_key: str = "train_loss") -> dict[str, float]:
    """Per method, the learning rate with the lowest mean AUC over the seeds."""
    by = {}
    for r in runs:
        by.setdefault(r["method"], {}).setdefault(r["lr"], []).append(auc(r[curve_key]))
    return {
        method: min(lrs, key=lambda lr: float(np.mean(lrs[lr])))
        for method, lrs in by.items()
    }


def of(runs, method, lr):
    return [r for r in runs if r["method"] == method and r["lr"] == lr]


def stats(values) -> str:
    values = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(values)):
        return "diverged"
    return f"{values.mean():.4f} ± {values.std():.4f}"


def time_epochs(
    timer: Callable[[str, float], Callable[[], float]],
    best: dict[str, float],
    methods,
    out: pathlib.Path,
    rounds: int,
) -> dict[str, float]:
    """The median time of a training epoch of each method at its selected learning
    rate, in milliseconds, measured round-robin (one epoch of each method per round,
    after one warm-up epoch that compiles), so that a busy machine slows all methods
    alike. `timer(method, lr)` returns a function that trains one epoch and returns
    its duration. Saved to `out/timing.json` and reused while the selection holds."""
    path = out / "timing.json"
    key = dict(best={m: best[m] for m in methods}, rounds=rounds)
    if path.exists():
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            return saved["ms"]
    print(
        f"timing {len(methods)} methods, {rounds} epochs each, round-robin", flush=True
    )
    epochs = {m: timer(m, best[m]) for m in methods}
    for run_epoch in epochs.values():
        run_epoch()  # compiles
    times = {m: [] for m in methods}
    for _ in range(rounds):
        for m in methods:
            times[m].append(epochs[m]())
    ms = {m: 1e3 * float(np.median(times[m])) for m in methods}
    _write_json(path, dict(key=key, ms=ms, times=times))
    return ms


def sweep_table(runs, methods, curve_key="train_loss") -> str:
    """Mean AUC for every (method, learning rate): the whole sweep. "div.": a seed
    diverged (non-finite loss); "err.": a seed stopped on a failed run-time check;
    blank: not run."""
    lrs = sorted({r["lr"] for r in runs})
    head = "| method | " + " | ".join(f"{lr:g}" for lr in lrs) + " |"
    lines = [head, "|---" * (len(lrs) + 1) + "|"]
    best = select(runs, curve_key)
    for m in methods:
        cells = []
        for lr in lrs:
            values = [auc(r[curve_key]) for r in of(runs, m, lr)]
            if not values:
                cells.append("")
                continue
            finite = np.all(np.isfinite(values))
            cell = f"{np.mean(values):.3f}" if finite else "div."
            if any(r.get("error") for r in of(runs, m, lr)):
                cell = "err."  # a solver's run-time check failed
            cells.append(f"**{cell}**" if lr == best[m] else cell)
        lines.append(f"| {LABELS[m]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def environment() -> str:
    return (
        f"jax {jax.__version__}, eqxjd {eqxjd.__version__}, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
        f"Python {platform.python_version()}"
    )


def command() -> str:
    return "python " + " ".join([sys.argv[0], *sys.argv[1:]])


def plot_curves(
    runs,
    best,
    methods,
    epoch_ms,
    path,
    title,
    curve_key="train_loss",
    ylabel="training loss",
    ylog=True,
):
    """Two panels: the curve against epochs and against training time (epochs times
    the method's median time per epoch); mean over seeds, shaded between the lowest
    and highest seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    colors = plt.get_cmap("tab10")
    for i, m in enumerate(methods):
        rs = of(runs, m, best[m])
        curves = np.asarray([r[curve_key] for r in rs], dtype=np.float64)
        if not np.all(np.isfinite(curves)):
            continue
        mean = curves.mean(axis=0)
        epochs = np.arange(curves.shape[1])
        wall = epochs * epoch_ms[m] / 1e3
        label = f"{LABELS[m]} (lr {best[m]:g})"
        style = dict(color=colors(i), lw=2.2 if m in ("upgrad", "mean") else 1.3)
        for ax, x in ((axes[0], epochs), (axes[1], wall)):
            ax.plot(x, mean, label=label, **style)
            ax.fill_between(
                x, curves.min(axis=0), curves.max(axis=0), color=colors(i), alpha=0.12
            )
    axes[0].set_xlabel("epoch")
    axes[1].set_xlabel("training time (s)")
    axes[0].set_ylabel(ylabel)
    for ax in axes:
        if ylog:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
