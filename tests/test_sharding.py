"""Multi-device Jacobian descent on 8 host-platform CPU devices.

JAX reads `XLA_FLAGS=--xla_force_host_platform_device_count=8` only when it starts, so
the checks run in subprocesses: `tests/sharding_checks.py` compares sharded
computations with the same computations on one device, in float64;
`tests/deadlock_check.py` runs data-parallel steps at a size that used to deadlock,
under a timeout.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys

import pytest


_TESTS = pathlib.Path(__file__).parent


def _run(script: str, timeout: float) -> dict[str, float]:
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    # The checkout's eqxjd, whether or not it is the installed one.
    root = str(_TESTS.parent)
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    # Its own process group, so that a hung run is killed with whatever it started.
    proc = subprocess.Popen(
        [sys.executable, str(_TESTS / script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=root,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"{script} did not finish in {timeout} s (a hang?)")
    assert proc.returncode == 0, stderr[-4000:]
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def results() -> dict[str, float]:
    return _run("sharding_checks.py", timeout=900)


def test_every_check_ran(results):
    expected_prefixes = (
        "data_parallel/iwrm/",
        "data_parallel/iwrm_gradients/",
        "data_parallel/iwmtl_gradients/",
        "data_parallel/iwmtl/",
        "data_parallel/iwrm_partial/",
        "data_parallel/gramian",
        "data_parallel/gramian_gradients",
        "data_parallel/gradvac_steps",
        "data_parallel/ambient_mesh",
        "data_parallel/eager",
        "data_parallel/fsdp_data/",
        "data_parallel/fsdp_tuple/",
        "data_parallel/fsdp_fsdp/",
        "gspmd/batch_sharded",
        "gspmd/param_sharded",
        "gspmd/param_sharded_generic",
        "aggregator_param_sharded/",
        "sharded_gramian",
        "sharded_gramian_grad",
        "sharded_gramian_ambient",
        "linalg/one_at_a_time",
    )
    for prefix in expected_prefixes:
        assert any(name.startswith(prefix) for name in results), prefix


def test_matches_single_device(results):
    bad = {name: err for name, err in results.items() if not err <= 1e-12}
    assert not bad, bad


def test_data_parallel_does_not_hang():
    # Batch 256 on 8 CPU devices: batched LAPACK calls on every device deadlocked
    # XLA's thread pool (UPGrad, lane-split and replicated).
    seconds = _run("deadlock_check.py", timeout=900)
    assert set(seconds) == {"upgrad", "cr_mogm_upgrad"}
