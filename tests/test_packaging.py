"""The built wheel, not only the editable install, is a working package.

The wheel is built from the checkout (`pip wheel --no-build-isolation`, so no network;
hatchling is in the `test` extra), its file list is compared with the source tree, and
it is installed with pip into a temporary directory, where a fresh interpreter imports
it and runs an aggregator. About ten seconds.
"""

import os
import pathlib
import subprocess
import sys
import zipfile

import pytest


ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> pathlib.Path:
    pytest.importorskip("hatchling")
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps"]
        + ["--no-build-isolation", "--no-index", "-q", "-w", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    (path,) = out.glob("eqxjd-*.whl")
    return path


def test_wheel_contents(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    package = {n for n in names if n.startswith("eqxjd/")}
    source = {
        str(p.relative_to(ROOT))
        for p in (ROOT / "eqxjd").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    assert "eqxjd/py.typed" in package
    assert package == source
    assert not any(n.endswith(".pyc") for n in names)
    # Only the package and its metadata: no tests, examples, docs or experiments.
    assert all(n.startswith(("eqxjd/", "eqxjd-")) for n in names), sorted(names)
    (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
    requires = [
        line.split(":", 1)[1].strip()
        for line in zipfile.ZipFile(wheel).read(metadata).decode().splitlines()
        if line.startswith("Requires-Dist:")
    ]
    core = [r for r in requires if "extra ==" not in r]
    # Flax, optax and the progress bar are optional.
    assert not any(r.startswith(("flax", "optax", "tqdm")) for r in core), core
    assert any(r.startswith("flax") and "extra == 'flax'" in r for r in requires)


def test_wheel_installs_and_imports(wheel, tmp_path):
    target = tmp_path / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q"]
        + ["--target", str(target), str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    code = (
        "import importlib.metadata, pathlib, sys\n"
        "import jax.numpy as jnp\n"
        "import eqxjd\n"
        "where = pathlib.Path(eqxjd.__file__).parent\n"
        f"assert where == pathlib.Path({str(target / 'eqxjd')!r}), where\n"
        "assert (where / 'py.typed').is_file()\n"
        "assert eqxjd.__version__ == importlib.metadata.version('eqxjd')\n"
        "print(eqxjd.UPGrad()(jnp.array([[1.0, 0.0], [-0.5, 1.0]])))\n"
    )
    # Only the wheel on the path (the tests may run with the checkout on PYTHONPATH).
    env = dict(os.environ, PYTHONPATH=str(target), JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,  # not the checkout, whose eqxjd/ would shadow the wheel's
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
