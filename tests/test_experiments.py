"""The digits experiments of `docs/experiments.md` run in their quick mode, save one
file per run, write their table and plot, and skip finished runs when rerun."""

import json
import os
import pathlib
import subprocess
import sys

import pytest


ROOT = pathlib.Path(__file__).resolve().parent.parent
EXPERIMENTS = ROOT / "benchmarks" / "experiments"


def run_script(name, out, figures):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    # The checkout's eqxjd, whether or not it is the installed one.
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, str(EXPERIMENTS / f"{name}.py"), "--quick"]
        + ["--out", str(out), "--figures", str(figures)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


@pytest.mark.parametrize("name", ["digits_iwrm", "digits_mtl"])
def test_quick_run_and_resume(name, tmp_path):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    out, figures = tmp_path / "out", tmp_path / "figures"
    printed = run_script(name, out, figures)
    assert "3 runs in the grid: 0 finished, 3 to run" in printed
    runs = sorted((out / "runs").glob("*.json"))
    assert [p.stem for p in runs] == [
        "mean_lr0.1_seed0",
        "random_lr0.1_seed0",
        "upgrad_lr0.1_seed0",
    ]
    for path in runs:
        run = json.loads(path.read_text())
        assert len(run["train_loss"]) == run["config"]["epochs"] + 1
        assert run["train_loss"][-1] < run["train_loss"][0]  # it trains
    table = (out / "summary.md").read_text()
    for label in ("| UPGrad | 0.1 |", "| Mean (SGD) | 0.1 |", "| Random | 0.1 |"):
        assert label in table
    assert (figures / f"{name}.png").is_file()

    # Resumed: nothing left to run, the same table.
    printed = run_script(name, out, figures)
    assert "3 runs in the grid: 3 finished, 0 to run" in printed
    assert (out / "summary.md").read_text().split("`python")[0] == table.split(
        "`python"
    )[0]
