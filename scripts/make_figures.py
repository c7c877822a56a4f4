"""Draws the figures of the eqxjd docs into `docs/_static/`.

Run from the root of a checkout (needs matplotlib, in the `examples` and `test` extras):

    python scripts/make_figures.py              # the figure of the home page
    python scripts/make_figures.py --examples   # also the plots of the example pages

It writes `docs/_static/conflicting_gradients.png`: two conflicting gradients in the
plane, the dual cone of the rows (the directions that conflict with neither), and the
updates of `eqxjd.Mean` (which conflicts with the first objective) and `eqxjd.UPGrad`
(which lies in the dual cone).

With `--examples [NAME ...]` it also runs the scripts of `examples/` (all of them, or
the named ones) with their default settings (`--quick` for their quick mode), and copies
the plot each one saves to `examples/output/<name>.png` into
`docs/_static/examples/<name>.png`, shrunk to at most 900 pixels wide. The PNGs are
committed; rerun the script after changing an example or a figure.
"""

import argparse
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import matplotlib


matplotlib.use("Agg")
import eqxjd
import matplotlib.pyplot as plt
import numpy as np


jax.config.update("jax_enable_x64", True)
ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "_static"
EXAMPLES = ROOT / "examples"


def _perp(v: np.ndarray) -> np.ndarray:
    return np.array([-v[1], v[0]])


def conflicting_gradients(path: pathlib.Path) -> None:
    jacobian = jnp.array([[-1.5, 1.0], [3.5, 0.3]], dtype=jnp.float64)
    g1, g2 = np.asarray(jacobian)
    mean = np.asarray(eqxjd.Mean()(jacobian))
    upgrad = np.asarray(eqxjd.UPGrad()(jacobian))
    assert g1 @ g2 < 0 and g1 @ mean < 0  # the rows conflict, and the mean with g1
    assert np.all(np.asarray(jacobian) @ upgrad >= -1e-12)  # UPGrad conflicts with none

    # Edges of the dual cone {x : g1.x >= 0, g2.x >= 0}: one normal of each row.
    e1 = _perp(g1) * np.sign(_perp(g1) @ g2)
    e2 = _perp(g2) * np.sign(_perp(g2) @ g1)
    radius = 8.0
    cone = np.array(
        [[0.0, 0.0], radius * e1 / np.linalg.norm(e1), radius * e2 / np.linalg.norm(e2)]
    )

    fig, ax = plt.subplots(figsize=(6.6, 3.4), dpi=110)
    ax.fill(cone[:, 0], cone[:, 1], color="tab:green", alpha=0.15, lw=0)
    ax.text(
        0.9,
        1.95,
        "dual cone:\nno conflict with\neither objective",
        color="tab:green",
        fontsize=9,
    )
    for v, name, colour in (
        (g1, r"$g_1$", "tab:blue"),
        (g2, r"$g_2$", "tab:orange"),
        (mean, r"Mean (conflicts with $g_1$)", "tab:red"),
        (upgrad, "UPGrad", "tab:green"),
    ):
        ax.annotate(
            "",
            xy=v,
            xytext=(0, 0),
            arrowprops=dict(arrowstyle="-|>", color=colour, lw=2.2),
        )
        ax.text(v[0] + 0.08, v[1] + 0.08, name, color=colour, fontsize=11)
    ax.set_xlim(-2.0, 4.6)
    ax.set_ylim(-0.4, 2.6)
    ax.set_aspect("equal")
    ax.axhline(0, color="0.8", lw=0.8, zorder=0)
    ax.axvline(0, color="0.8", lw=0.8, zorder=0)
    ax.set_title(
        r"Conflicting gradients: $g_1 \cdot g_2 < 0$; the mean conflicts with $g_1$",
        fontsize=10,
    )
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _shrink(path: pathlib.Path, max_width: int = 900) -> None:
    from PIL import Image  # installed with matplotlib

    with Image.open(path) as image:
        if image.width <= max_width:
            return
        height = round(image.height * max_width / image.width)
        small = image.resize((max_width, height), Image.Resampling.LANCZOS)
    small.save(path, optimize=True)


def example_plots(names: list[str], quick: bool) -> None:
    """Runs the examples and copies their plots into docs/_static/examples/."""
    target = OUT / "examples"
    target.mkdir(parents=True, exist_ok=True)
    scripts = sorted(EXAMPLES.glob("*.py"))
    if names:
        scripts = [s for s in scripts if s.stem in names]
    for script in scripts:
        png = EXAMPLES / "output" / f"{script.stem}.png"
        png.unlink(missing_ok=True)
        if quick:
            command = [
                sys.executable,
                "-c",
                "import runpy, sys; "
                f"runpy.run_path({str(script)!r})['main'](quick=True)",
            ]
        else:
            command = [sys.executable, str(script)]
        print(f"Running {script.name} ...", flush=True)
        run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        if run.returncode != 0:
            print(f"  failed:\n{run.stderr[-2000:]}")
            continue
        if png.is_file():
            shutil.copyfile(png, target / png.name)
            _shrink(target / png.name)
            print(f"  wrote {target / png.name}")
        else:
            print("  (no plot)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", nargs="*", metavar="NAME")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    conflicting_gradients(OUT / "conflicting_gradients.png")
    print(f"Wrote {OUT / 'conflicting_gradients.png'}")
    if args.examples is not None:
        example_plots(args.examples, args.quick)


if __name__ == "__main__":
    main()
