"""PCGrad, Random and GradDrop: TorchJD 0.18.0 published values given TorchJD's draws,
the draws themselves, special cases, custom GradDrop functions and hyperparameter
checks (the key rules of every random method: test_generic.py)."""

import equinox as eqx
import eqxjd
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from eqxjd._aggregation.graddrop import graddrop
from eqxjd._aggregation.pcgrad import pcgrad_permutations, pcgrad_weights

from .helpers import (
    outputs,
    pad,
    rel_err,
    small_kinds,
)


J_BASE = jnp.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
J_5X7 = jnp.asarray(np.random.RandomState(0).randn(5, 7))


def _gramian(J):
    return jnp.matmul(J, J.T, precision=jax.lax.Precision.HIGHEST)


_graddrop_core = jax.jit(graddrop)


def test_pcgrad_published_values():
    # TorchJD 0.18.0: J_5x7 with the permutations TorchJD drew (seed 0).
    perms = jnp.array(
        [
            [4, 0, 1, 3, 2],
            [3, 4, 0, 1, 2],
            [2, 4, 1, 3, 0],
            [1, 4, 3, 2, 0],
            [1, 0, 4, 2, 3],
        ]
    )
    w = pcgrad_weights(_gramian(J_5X7), perms)
    expected = [1, 2.841342726, 1.103779291, 1.365391734, 1.213572897]
    assert rel_err(w, expected) < 1e-9
    d = w @ J_5X7
    expected_d = [4.576506427, 3.438647907, 2.969216603, 5.981752896, 3.282033494,
                  -2.099004672, -2.199924486]  # fmt: skip
    assert rel_err(d, expected_d) < 1e-9


def test_pcgrad_permutations_are_permutations():
    perms = pcgrad_permutations(jr.key(0), 6)
    assert perms.shape == (6, 6)
    np.testing.assert_array_equal(
        np.sort(np.asarray(perms), axis=1), np.tile(np.arange(6), (6, 1))
    )
    assert len({tuple(p) for p in np.asarray(perms)}) > 1  # one subkey per row


def test_pcgrad_special_cases():
    key = jr.key(0)
    agg = eqxjd.PCGrad()
    w, d = outputs(agg, jnp.zeros((0, 3)), key)
    assert w.shape == (0,)
    np.testing.assert_array_equal(d, jnp.zeros(3))
    w, d = outputs(agg, jnp.zeros((5, 7)), key)  # zero J: w = 1, d = 0
    np.testing.assert_array_equal(w, jnp.ones(5))
    np.testing.assert_array_equal(d, jnp.zeros(7))
    w, d = outputs(agg, jnp.array([[1.0, 2.0, 3.0]]), key)
    np.testing.assert_array_equal(d, jnp.array([1.0, 2.0, 3.0]))
    w, d = outputs(agg, jnp.asarray(pad([[1.0, 0.0], [-1.0, 0.0]], (2, 102))), key)
    np.testing.assert_array_equal(w, jnp.array([2.0, 2.0]))  # anti-parallel
    np.testing.assert_array_equal(d, jnp.zeros(102))
    # A NaN column makes the whole Gramian NaN: NaN weights, so an all-NaN update.
    # (TorchJD's comparisons with NaN fail, so it skips every projection and returns
    # the plain row sum outside the NaN column: a finite but meaningless update.)
    w, d = outputs(agg, J_5X7.at[:, 2].set(jnp.nan), key)
    assert bool(jnp.all(jnp.isnan(w))) and bool(jnp.all(jnp.isnan(d)))
    for kind in ("conflicting", "zero", "single"):
        assert bool(jnp.all(jnp.isfinite(outputs(agg, small_kinds()[kind], key)[1]))), (
            kind
        )


def test_random_weights_from_key():
    key = jr.key(3)
    w = eqxjd.RandomWeighting()(J_5X7, key=key)
    np.testing.assert_allclose(
        w, jax.nn.softmax(jr.normal(key, (5,), jnp.float64)), rtol=1e-15
    )
    assert bool(jnp.all(w > 0)) and abs(float(jnp.sum(w)) - 1) < 1e-14
    # It reads only the number of rows: a Gramian gives the same weights.
    np.testing.assert_array_equal(eqxjd.RandomWeighting()(_gramian(J_5X7), key=key), w)
    _, d = outputs(eqxjd.Random(), jnp.zeros((0, 4)), key)
    np.testing.assert_array_equal(d, jnp.zeros(4))


def _numpy_graddrop(J, U, f, leak):
    P = 0.5 * (1.0 + J.sum(0) / np.abs(J).sum(0))
    M = (f(P) > U) * (J > 0) + (f(P) < U) * (J < 0)
    return ((leak[:, None] + (1 - leak[:, None]) * M) * J).sum(0)


def _square(p):
    return p**2


def test_graddrop_custom_f_and_key():
    J, key = J_5X7, jr.key(4)
    leak = jnp.linspace(0.0, 0.4, 5)
    agg = eqxjd.GradDrop(f=_square, leak=leak)
    u = jr.uniform(key, (7,), jnp.float64)
    expected = _numpy_graddrop(np.asarray(J), np.asarray(u), _square, np.asarray(leak))
    np.testing.assert_allclose(agg(J, key=key), expected, rtol=1e-14)

    # A module as `f` (with an array inside) works under filter_jit.
    class Power(eqx.Module):
        p: jax.Array

        def __call__(self, x):
            return x**self.p

    jitted = eqx.filter_jit(lambda a, x, k: a(x, key=k))
    out = jitted(eqxjd.GradDrop(f=Power(jnp.array(2.0)), leak=leak), J, key)
    np.testing.assert_allclose(out, expected, rtol=1e-14)


def test_graddrop_special_cases():
    key = jr.key(0)
    np.testing.assert_array_equal(
        eqxjd.GradDrop()(jnp.zeros((0, 3)), key=key), jnp.zeros(3)
    )
    assert eqxjd.GradDrop()(jnp.zeros((2, 0)), key=key).shape == (0,)
    np.testing.assert_array_equal(
        eqxjd.GradDrop()(jnp.zeros((3, 4)), key=key), jnp.zeros(4)
    )
    # A zero column contributes 0; NaN stays in its column only.
    J = J_5X7.at[:, 1].set(0.0)
    assert float(eqxjd.GradDrop()(J, key=key)[1]) == 0.0
    for call in (eqxjd.GradDrop(), eqx.filter_jit(eqxjd.GradDrop())):
        d = call(J_5X7.at[:, 2].set(jnp.nan), key=key)
        assert bool(jnp.isnan(d[2])) and bool(jnp.all(jnp.isfinite(jnp.delete(d, 2))))


def test_graddrop_bad_input():
    with pytest.raises((TypeError, ValueError)):
        eqxjd.GradDrop(leak=jnp.ones((2, 2)))
    with pytest.raises((TypeError, ValueError)):
        eqxjd.GradDrop(leak=jnp.array(0.5))
    with pytest.raises((TypeError, ValueError)):
        eqxjd.GradDrop(leak=jnp.array([0.1, 0.2, 0.3]))(J_BASE, key=jr.key(0))


def test_pcgrad_bad_input():
    with pytest.raises((TypeError, ValueError)):
        eqxjd.PCGradWeighting()(jnp.ones((2, 3)), key=jr.key(0))
    with pytest.raises((TypeError, ValueError)):
        eqxjd.PCGrad()(jnp.ones(3), key=jr.key(0))
    with pytest.raises((TypeError, ValueError)):
        pcgrad_weights(_gramian(J_5X7), jnp.zeros((4, 5), jnp.int32))
