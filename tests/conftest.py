import os


# The tests compile far more than they run: XLA's lowest backend optimisation level
# compiles about twice as fast (subprocesses started by the tests inherit it).
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    ).strip()

import equinox.internal as eqxi
import jax
import pytest


# float64 by default; `EQXJD_TEST_X64=0` runs the suite in JAX's default mode (float32
# only), the one most users run. Tests that need float64 skip themselves there.
X64 = os.environ.get("EQXJD_TEST_X64", "1") != "0"
jax.config.update("jax_enable_x64", X64)
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")


@pytest.fixture
def getkey():
    return eqxi.GetKey()


_TESTS_PER_CACHE = 200
_tests_run = [0]


@pytest.fixture(autouse=True)
def _clear_jax_caches():
    # A worker runs ~1000 tests; dropping the compiled executables every few hundred
    # keeps the memory of the XLA compiler bounded (a long run once crashed inside
    # compilation), while the tests of one method, run together, share them.
    yield
    _tests_run[0] += 1
    if _tests_run[0] % _TESTS_PER_CACHE == 0:
        jax.clear_caches()
