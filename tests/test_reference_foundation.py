"""UPGrad, DualProj, Mean, Sum, Constant against TorchJD 0.18.0 on every matrix kind.

Fixtures: tests/reference/foundation*.npz (see tests/reference/README.md). Matrices are
grouped by shape so that each shape compiles once.
"""

import collections

import equinox as eqx
import eqxjd
import jax.numpy as jnp
import numpy as np
import pytest

from .helpers import load_reference, reference_names, rel_err


DATA = load_reference("foundation")
METHODS = ("upgrad", "dualproj", "mean", "sum", "constant")
BY_SHAPE = collections.defaultdict(list)
for _name in reference_names(DATA, "upgrad"):
    BY_SHAPE[DATA[f"J/{_name}"].shape].append(_name)


@eqx.filter_jit
def _outputs(J):
    m = J.shape[0]
    aggregators = (
        eqxjd.UPGrad(),
        eqxjd.DualProj(),
        eqxjd.Mean(),
        eqxjd.Sum(),
        eqxjd.Constant(jnp.arange(1.0, m + 1)),
    )
    return {
        method: (agg.weights(J), agg(J)) for method, agg in zip(METHODS, aggregators)
    }


@eqx.filter_jit
def _weights_and_output(agg, J):
    return agg.weights(J), agg(J)


def _scale_free_err(ours, theirs):
    # Relative to the largest entry, so 1e-10- and 1e15-scaled matrices get the same
    # relative tolerance.
    scale = max(float(np.max(np.abs(theirs), initial=0.0)), 1e-300)
    return float(np.max(np.abs(np.asarray(ours) - theirs), initial=0.0)) / scale


@pytest.mark.parametrize("shape", sorted(BY_SHAPE), ids=str)
def test_matches_torchjd_float64(shape):
    for name in BY_SHAPE[shape]:
        outputs = _outputs(jnp.asarray(DATA[f"J/{name}"]))
        for method, (w, d) in outputs.items():
            assert rel_err(w, DATA[f"{method}/{name}/w"]) < 1e-7, (name, method)
            assert _scale_free_err(d, DATA[f"{method}/{name}/d"]) < 1e-7, (name, method)


@pytest.mark.parametrize("method", ("upgrad_pref", "dualproj_pref"))
def test_pref_vector_matches_torchjd(method):
    cls = eqxjd.UPGrad if method.startswith("upgrad") else eqxjd.DualProj
    for name in reference_names(DATA, method):
        J = jnp.asarray(DATA[f"J/{name}"])
        agg = cls(pref_vector=jnp.asarray(DATA[f"{method}/{name}/pref"]))
        w, d = _weights_and_output(agg, J)
        assert rel_err(w, DATA[f"{method}/{name}/w"]) < 1e-7, name
        assert rel_err(d, DATA[f"{method}/{name}/d"]) < 1e-7, name


def test_float32_matches_torchjd():
    for name in reference_names(DATA, "upgrad_f32"):
        J = jnp.asarray(DATA[f"J/{name}"], dtype=jnp.float32)
        for method, (w, d) in _outputs(J).items():
            if f"{method}_f32/{name}/d" not in DATA:
                continue
            assert d.dtype == jnp.float32
            expected = DATA[f"{method}_f32/{name}/d"]
            scale = max(1.0, float(np.abs(expected).max()))
            np.testing.assert_allclose(d, expected, atol=1e-4 * scale, err_msg=name)
