import equinox.internal as eqxi
import jax
import pytest


jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")


@pytest.fixture
def getkey():
    return eqxi.GetKey()


@pytest.fixture(autouse=True, scope="module")
def _clear_jax_caches():
    # One process runs ~600 tests; dropping each module's compiled executables keeps the
    # memory of the XLA compiler bounded (a long run once crashed inside compilation).
    yield
    jax.clear_caches()
