"""Data-parallel Jacobian descent across two processes (JAX's distributed runtime on
127.0.0.1, 4 CPU devices per process): the steps against the same steps on one
device, the rejection of host-local batches, and the multi-host example's training
loop. One launch of `tests/multi_host_worker.py` serves every test."""

import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import eqxjd
import numpy as np
import pytest

from . import multi_host_worker as worker


_WORKER = pathlib.Path(worker.__file__)
_ROOT = _WORKER.parent.parent
_TIMEOUT = 300


def _free_port() -> int | None:
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    except OSError:
        return None


def _kill(procs) -> None:
    # Each worker leads its own process group: SIGKILL reaches it and anything it
    # started, even blocked in a collective (where SIGTERM may be ignored).
    for proc in procs:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for proc in procs:
        proc.wait()


def _launch(out_dir: pathlib.Path, port: int) -> list[int | None]:
    """Runs the worker as processes 0 and 1 to the end; returns their exit codes
    (`None`: killed at the timeout), with their output in `out_dir/log_{i}.txt`. On a
    failure or a timeout, the other process is killed at once."""
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(_ROOT), env.get("PYTHONPATH", "")])
    procs = []
    try:
        for process_id in range(2):
            argv = [str(_WORKER), str(process_id), str(port), str(out_dir)]
            with open(out_dir / f"log_{process_id}.txt", "w") as log:
                procs.append(
                    subprocess.Popen(
                        [sys.executable] + argv,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        env=env,
                        cwd=_ROOT,
                        start_new_session=True,
                    )
                )
        deadline = time.monotonic() + _TIMEOUT
        while time.monotonic() < deadline:
            codes = [proc.poll() for proc in procs]
            if all(code is not None for code in codes) or any(codes):
                break
            time.sleep(0.2)
        return [proc.poll() for proc in procs]
    finally:
        _kill(procs)


def _logs(out_dir: pathlib.Path) -> list[str]:
    return [(out_dir / f"log_{i}.txt").read_text() for i in range(2)]


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> list[dict[str, np.ndarray]]:
    if not hasattr(os, "killpg"):
        pytest.skip("needs POSIX process groups to clean up the worker processes")
    port = _free_port()
    if port is None:
        pytest.skip("cannot bind a TCP port on 127.0.0.1")
    out_dir = tmp_path_factory.mktemp("multi_host")
    codes = _launch(out_dir, port)
    if codes != [0, 0]:
        what = f"timed out after {_TIMEOUT} s" if None in codes else "failed"
        logs = [log[-3000:] for log in _logs(out_dir)]
        pytest.fail(f"{what}: exit codes {codes}\n" + "\n-----\n".join(logs))
    return [dict(np.load(out_dir / f"process_{i}.npz")) for i in range(2)]


def test_host_local_batch_rejected(outputs):
    for out in outputs:
        assert bool(out["rejected_host_local"])


def test_processes_agree(outputs):
    first, second = outputs
    assert first.keys() == second.keys()
    for name in first:
        np.testing.assert_array_equal(first[name], second[name])


@pytest.mark.parametrize("name", sorted(worker.aggregators()))
def test_matches_one_device(outputs, name):
    model, xs, ys = worker.problem()
    aggregator = worker.aggregators()[name]
    expected = worker.train(aggregator, eqxjd.PerSampleGramian(), model, xs, ys)
    for i, leaf in enumerate(expected):
        got = outputs[0][f"{name}/{i}"]
        assert got.dtype == np.float64
        np.testing.assert_allclose(got, np.asarray(leaf), rtol=0, atol=1e-12)


def test_example(outputs):
    # `examples/multi_host.py`'s training loop, run by the worker in its runtime.
    losses = outputs[0]["example"]
    assert losses.shape == (worker.EXAMPLE_STEPS,)
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses
