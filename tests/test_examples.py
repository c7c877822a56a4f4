"""Every example runs in a quick mode, saves its plot and makes its losses go down."""

import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import pytest


EXAMPLES = pathlib.Path(__file__).parent.parent / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(
        f"examples_{name}", EXAMPLES / f"{name}.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_went_down(history):
    history = np.asarray(history)
    assert history.ndim == 2 and history.shape[0] >= 2
    assert np.all(np.isfinite(history))
    assert np.all(history[-1] < history[0]), (history[0], history[-1])


def run(name, capsys):
    pytest.importorskip("matplotlib")
    png = EXAMPLES / "output" / f"{name}.png"
    png.unlink(missing_ok=True)
    out = load(name).main(quick=True)
    assert png.exists()
    return out, capsys.readouterr().out


def test_basic_usage(capsys):
    history, printed = run("basic_usage", capsys)
    assert history.shape == (10, 2)
    assert_went_down(history)
    assert "loss1" in printed and "loss2" in printed


def test_mtl(capsys):
    pytest.importorskip("sklearn")
    histories, printed = run("mtl", capsys)
    for history in histories.values():
        assert_went_down(history)
    assert printed.count("test:") == 2 and "accuracy" in printed


def test_iwrm(capsys):
    histories, _ = run("iwrm", capsys)
    for history in histories.values():
        assert_went_down(np.asarray(history)[:, None])


def test_partial_jd(capsys):
    history, _ = run("partial_jd", capsys)
    assert_went_down(history)


def test_monitoring(capsys):
    history, printed = run("monitoring", capsys)
    assert_went_down(history)
    assert "weights" in printed and "cos(update, mean grad)" in printed


def test_grouping(capsys):
    histories, _ = run("grouping", capsys)
    assert set(histories) == {"whole model", "per layer"}  # quick mode: two of four
    for history in histories.values():
        assert_went_down(history)


def test_optax_adam(capsys):
    pytest.importorskip("optax")
    history, _ = run("optax_adam", capsys)
    assert_went_down(history)


def test_iwrm_gramian(capsys):
    histories, printed = run("iwrm_gramian", capsys)
    for history in histories.values():
        assert_went_down(np.asarray(history)[:, None])
    assert "[iwrm]" in printed and "[erm]" in printed


def test_iwmtl(capsys):
    history, printed = run("iwmtl", capsys)
    assert_went_down(history)
    assert "weights (8, 2)" in printed


def test_sharded_iwrm():
    # 8 host devices must be requested before JAX starts: a fresh process.
    pytest.importorskip("matplotlib")
    png = EXAMPLES / "output" / "sharded_iwrm.png"
    png.unlink(missing_ok=True)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    # The checkout's eqxjd, whether or not it is the installed one.
    env["PYTHONPATH"] = os.pathsep.join(
        [str(EXAMPLES.parent), env.get("PYTHONPATH", "")]
    )
    proc = subprocess.run(
        [sys.executable, "-c", "import sharded_iwrm; sharded_iwrm.main(quick=True)"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=EXAMPLES,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    printed = proc.stdout
    assert "mesh: 8 device(s)" in printed
    diff = re.search(r"one device\| = (\S+)", printed)
    assert diff is not None and float(diff.group(1)) < 1e-4, printed
    lines = printed.splitlines()
    losses = [float(line.split()[-1]) for line in lines if "mean loss" in line]
    assert len(losses) == 4 and losses[-1] < losses[0], printed
    assert png.exists()


def run_as_a_user(name, capsys):
    # Flax and optax assume JAX's default promotion rules, not the suite's strict ones.
    with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
        return run(name, capsys)


def test_flax_nnx_mtl(capsys):
    pytest.importorskip("flax")
    pytest.importorskip("sklearn")
    histories, printed = run_as_a_user("flax_nnx_mtl", capsys)
    assert set(histories) == {"upgrad", "mean"}
    for history in histories.values():
        assert_went_down(history)
    assert printed.count("test accuracy") == 2


def test_flax_linen_iwrm(capsys):
    pytest.importorskip("flax")
    pytest.importorskip("sklearn")
    histories, printed = run_as_a_user("flax_linen_iwrm", capsys)
    for history in histories.values():
        assert_went_down(np.asarray(history)[:, None])
    assert "[iwrm]" in printed and "[erm]" in printed
