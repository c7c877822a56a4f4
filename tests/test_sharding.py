"""Multi-device Jacobian descent on 8 host-platform CPU devices.

JAX reads `XLA_FLAGS=--xla_force_host_platform_device_count=8` only when it starts, so
the checks run in a subprocess (`tests/sharding_checks.py`); each compares a sharded
computation with the same computation on one device, in float64.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest


_SCRIPT = pathlib.Path(__file__).parent / "sharding_checks.py"


@pytest.fixture(scope="module")
def results() -> dict[str, float]:
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    # The checkout's eqxjd, whether or not it is the installed one.
    root = str(_SCRIPT.parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, str(_SCRIPT)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=pathlib.Path(__file__).parent.parent,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_check_ran(results):
    expected_prefixes = (
        "data_parallel/iwrm/",
        "data_parallel/iwmtl/",
        "data_parallel/iwrm_partial/",
        "gspmd/batch_sharded",
        "gspmd/param_sharded",
        "gspmd/param_sharded_generic",
        "aggregator_param_sharded/",
        "sharded_gramian",
    )
    for prefix in expected_prefixes:
        assert any(name.startswith(prefix) for name in results), prefix


def test_matches_single_device(results):
    bad = {name: err for name, err in results.items() if not err <= 1e-10}
    assert not bad, bad
