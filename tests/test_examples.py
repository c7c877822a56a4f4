"""Every example runs in a quick mode, saves its plot and makes its losses go down."""

import importlib.util
import pathlib

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
    assert "Gramian" in printed
