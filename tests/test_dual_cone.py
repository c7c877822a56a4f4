"""UPGrad and DualProj: TorchJD 0.18.0 published values with every solver, strict
non-conflict with `reg_eps=0`, the choice of solver, special cases, hyperparameter
checks and the differentiable solves (`differentiable=True`). Non-conflict within the
documented bound, invariances and exactness are property-tested (test_properties.py)."""

from typing import Literal

import eqxjd
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

from .helpers import (
    conflicting,
    finite_difference_jvp,
    low_rank,
    rel_err,
)


SOLVERS = ("bpp", "nesterov_pgd", "qpax")
J_BASE = np.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
J_5X7 = np.random.RandomState(0).randn(5, 7)
J_KRUM = np.array(
    [[1, 1, 1], [1, 0, 1], [75, -666, 23], [1, 2, 3], [2, 0, 1]], dtype=np.float64
)

# TorchJD 0.18.0, float64 (J_base, J_5x7 and J_Krum of its
# tests/unit/aggregation/test_values.py): (aggregator, J, d, w).
PUBLISHED = [
    (
        "upgrad",
        J_BASE,
        [0.2929020002, 1.900352078, 1.900352078],
        [1.110921047, 0.7894310312],
    ),
    ("dualproj", J_BASE, [0.5563158129, 1.110921047, 1.110921047], [0.6109210468, 0.5]),
    (
        "upgrad_pref",
        J_BASE,
        [1.698435626, 6.02254625, 6.02254625],
        [3.443684187, 2.578862062],
    ),
    (
        "dualproj_pref",
        J_BASE,
        [2.225263251, 4.443684187, 4.443684187],
        [2.443684187, 2.0],
    ),
    (
        "upgrad",
        J_5X7,
        [
            0.9165312994,
            0.6849870014,
            0.6194725098,
            1.157813288,
            0.7068130482,
            -0.4273037019,
            -0.4375797466,
        ],
        [0.2, 0.5897231645, 0.2207460623, 0.2528101517, 0.2542813742],
    ),
    (
        "dualproj",
        J_5X7,
        [
            0.848591236,
            0.5928815305,
            0.4592395929,
            0.96553913,
            0.2585495553,
            -0.601074769,
            -0.4032644762,
        ],
        [0.2, 0.2, 0.2, 0.2, 0.2],
    ),
    (
        "upgrad",
        J_KRUM,
        [21.78351099, -123.5582759, 19.21658069],
        [2.088108311, 0.2, 0.2007808696, 4.036837458, 0.2],
    ),
    (
        "dualproj",
        J_KRUM,
        [21.2789313, -123.7129988, 18.29507118],
        [1.87086136, 0.2, 0.2, 3.808069941, 0.2],
    ),
]


Solver = Literal["bpp", "nesterov_pgd", "qpax"]


def _make(name, solver: Solver = "bpp", **kwargs):
    pref = jnp.array([1.0, 2.0]) if name.endswith("_pref") else None
    cls = eqxjd.UPGrad if name.startswith("upgrad") else eqxjd.DualProj
    return cls(pref_vector=pref, solver=solver, **kwargs)


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("case", range(len(PUBLISHED)))
def test_published_torchjd_values(solver, case):
    name, matrix, d, w = PUBLISHED[case]
    agg = _make(name, solver)
    J = jnp.asarray(matrix)
    assert rel_err(agg(J), d) < 1e-8
    assert rel_err(agg.weights(J), w) < 1e-8


def test_quick_start_float32():
    J = jnp.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]], dtype=jnp.float32)
    out = eqxjd.UPGrad(solver="nesterov_pgd")(J)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, [0.2929, 1.9004, 1.9004], atol=1e-4)


AGGREGATORS = (
    eqxjd.UPGrad(),
    eqxjd.UPGrad(solver="nesterov_pgd"),
    eqxjd.UPGrad(solver="qpax"),
    eqxjd.DualProj(),
    eqxjd.Mean(),
    eqxjd.Sum(),
)
NON_CONFLICTING = AGGREGATORS[:4]


# Non-conflict within the documented bound, permutation invariance and linearity under
# row scaling are property-tested in tests/test_properties.py.


def test_strongly_stationary_property(getkey):
    # A(J) = 0 only if J is strongly stationary: non-zero on non-stationary Jacobians.
    for agg in NON_CONFLICTING:
        # Full row rank (m <= n): not even weakly stationary.
        for J in (jr.normal(getkey(), (3, 5)), jr.normal(getkey(), (4, 6))):
            assert jnp.linalg.norm(agg(J)) > 5e-3


@pytest.mark.parametrize("solver", SOLVERS)
def test_reg_eps_zero_is_exactly_non_conflicting(solver, getkey):
    agg = eqxjd.UPGrad(reg_eps=0.0, solver=solver)
    for J in (low_rank(getkey(), 8, 20, 2), low_rank(getkey(), 10, 6, 3, spread=100.0)):
        y = J @ agg(J)
        assert jnp.all(y >= -1e-10 * jnp.linalg.norm(J) ** 2)


def test_special_cases():
    upgrad, dualproj = eqxjd.UPGrad(), eqxjd.DualProj()
    zero = jnp.zeros((3, 4))
    np.testing.assert_allclose(upgrad.weights(zero), jnp.full(3, 1 / 3))
    np.testing.assert_allclose(upgrad(zero), jnp.zeros(4))
    dup = jnp.array([[1.0, 0.0], [1.0, 0.0]])
    np.testing.assert_allclose(upgrad.weights(dup), [0.5, 0.5], atol=1e-12)
    anti = jnp.array([[1.0, 0.0], [-1.0, 0.0]])
    np.testing.assert_allclose(upgrad(anti), [0.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(dualproj.weights(anti), [0.5, 0.5], atol=1e-12)
    single = jnp.array([[1.0, 2.0, 3.0]])
    np.testing.assert_allclose(upgrad(single), single[0])
    # The tiny-Jacobian cliff of TorchJD: ||J||_F^2 < norm_eps gives the mean.
    tiny = jnp.asarray(J_BASE) * 1e-3
    np.testing.assert_allclose(upgrad(tiny), jnp.full(3, 1e-3), rtol=1e-12)
    np.testing.assert_allclose(dualproj(tiny), jnp.full(3, 1e-3), rtol=1e-12)


def test_bad_hyperparameters():
    with pytest.raises((TypeError, ValueError)):
        eqxjd.UPGrad(pref_vector=jnp.ones((2, 2)))
    with pytest.raises((TypeError, ValueError)):
        eqxjd.UPGrad(pref_vector=jnp.ones(3))(jnp.ones((2, 4)))
    with pytest.raises((TypeError, ValueError)):
        eqxjd.DualProj(norm_eps=-1.0)
    with pytest.raises((TypeError, ValueError)):
        eqxjd.UPGrad(reg_eps=-1.0)
    with pytest.raises((TypeError, ValueError)):
        eqxjd.UPGrad(solver="quadprog")  # pyright: ignore[reportArgumentType]
    with pytest.raises((TypeError, ValueError)):
        eqxjd.Constant(jnp.ones((2, 2)))
    with pytest.raises((TypeError, ValueError)):
        eqxjd.Constant(jnp.ones(3))(jnp.ones((2, 4)))


def test_solver_name_and_instance_agree(getkey):
    J = conflicting(getkey(), 6, 5)
    pairs: tuple[tuple[Solver, type[eqxjd.AbstractQPSolver]], ...] = (
        ("bpp", eqxjd.BPP),
        ("nesterov_pgd", eqxjd.NesterovPGD),
    )
    for name, cls in pairs:
        np.testing.assert_allclose(
            eqxjd.UPGrad(solver=name)(J), eqxjd.UPGrad(solver=cls())(J), rtol=1e-12
        )


@pytest.mark.parametrize("cls", (eqxjd.UPGrad, eqxjd.DualProj))
def test_differentiable_matches_finite_differences(cls, getkey):
    agg = cls(differentiable=True)
    f = lambda J: jnp.sum(agg(J) ** 2)
    J = jr.normal(getkey(), (5, 20))
    for J in (J, conflicting(getkey(), 5, 8)):
        tangent = jr.normal(getkey(), J.shape)
        ad = jnp.vdot(jax.grad(f)(J), tangent)
        fd = finite_difference_jvp(f, (J,), (tangent,), eps=1e-6)
        assert abs(ad - fd) < 1e-5 * max(1.0, abs(fd))
        # Forward mode agrees with reverse mode.
        _, jvp = jax.jvp(f, (J,), (tangent,))
        np.testing.assert_allclose(jvp, ad, rtol=1e-8)
    # Same value as the non-differentiable default.
    np.testing.assert_allclose(agg(J), cls()(J), rtol=1e-10)
