"""GradVac, PCD, ExcessMTL, CR-MOGM, MoDo and SDMGrad: TorchJD 0.18.0 published values,
special cases, randomness, the KKT conditions of PCD, warm-up and state behaviour, and
hyperparameter checks (the generic state rules: test_generic.py)."""

import equinox as eqx
import eqxjd
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from eqxjd._aggregation.gradvac import gradvac_orders
from eqxjd._aggregation.pcd import pcd_solve

from .helpers import (
    arrays,
    call,
    gradvac_core,
    rel,
    run_sequence,
    SEQ_REF,
    SEQS,
    step,
    weights_step,
)


J_BASE = np.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
J_5X7 = np.random.RandomState(0).randn(5, 7)


def test_gradvac_published_values():
    # TorchJD 0.18.0: J_base, two calls (the second sees phi_hat from the first).
    agg = arrays(eqxjd.GradVac())
    J = jnp.asarray(J_BASE)
    state = agg.init(J)
    d1, state = step(agg, J, state, jr.key(0))
    assert rel(state.phi_hat, [[0, -0.4205955119], [-0.4205955119, 0]]) < 1e-9
    d2, state = step(agg, J, state, jr.key(1))
    assert rel(d1, [0.5847953281, 3.801169586, 3.801169586]) < 1e-9
    assert rel(d2, [1.006540441, 3.264403077, 3.264403077]) < 1e-9
    assert rel(state.phi_hat, [[0, -0.6308932679], [-0.6308932679, 0]]) < 1e-9
    # TorchJD 0.18.0: J_5x7 with TorchJD's draws (seed 0 on both calls).
    G = jnp.asarray(J_5X7 @ J_5X7.T)
    draws = jnp.asarray(SEQ_REF["draws/s5"][0])
    w1, phi = gradvac_core(G, jnp.zeros((5, 5)), draws, 0.5, 1e-8)
    w2, _ = gradvac_core(G, phi, draws, 0.5, 1e-8)
    assert rel(w1, [1, 2.928923858, 1.101981977, 1.363415553, 1.213572896]) < 1e-9
    assert rel(w2, [1, 2.033075705, 1.051210751, 1.191980765, 1.169878214]) < 1e-9
    d = w1 @ jnp.asarray(J_5X7)
    ref = [
        4.56116096,
        3.427299882,
        3.003958608,
        5.990251682,
        3.411711825,
        -2.030907474,
        -2.184309616,
    ]
    assert rel(d, ref) < 1e-8


def test_gradvac_randomness():
    agg = arrays(eqxjd.GradVac())
    J = jnp.asarray(J_5X7)
    state = agg.init(J)
    d1, _ = weights_step(agg, J, state, jr.key(0))
    d2, _ = weights_step(agg, J, state, jr.key(0))
    outs = [weights_step(agg, J, state, jr.key(k))[0] for k in range(1, 6)]
    assert np.array_equal(d1, d2)
    assert any(not np.allclose(d1, d) for d in outs)
    with pytest.raises(ValueError, match="key"):
        agg(J, state)
    orders = gradvac_orders(jr.key(0), 5)
    assert orders.shape == (5, 4)
    assert np.all(np.sort(np.asarray(orders), axis=1) == np.arange(4))
    assert gradvac_orders(jr.key(0), 1).shape == (1, 0)
    # m = 1: the row itself.
    row = jnp.array([[1.0, 2.0, 3.0]])
    w, _ = weights_step(agg, row, agg.init(row), jr.key(0))
    assert np.array_equal(w, [1.0])


# ------------------------------------------------------------------------------------
# PCD

PCD_CONFIGS = {
    "pcd": dict(),
    "pcd_t0.5_b0.9": dict(tau=0.5, beta=0.9),
    "pcd_tauvec": dict(tau=jnp.array([0.1, 0.2, 0.3, 0.4]), beta=0.5),
}


def test_pcd_published_and_special_cases():
    agg = arrays(eqxjd.PCD())
    J = jnp.asarray(J_BASE)
    state = agg.init(J)
    for _ in range(2):  # TorchJD 0.18.0: the same output on both calls
        w, state = weights_step(agg, J, state)
        assert rel(w, [1.848060559, 1.095368248]) < 1e-9
    J = jnp.asarray(J_5X7)  # g1 already satisfies the constraints: d = g1
    w, _ = weights_step(agg, J, agg.init(J))
    assert np.array_equal(w, [1.0, 0.0, 0.0, 0.0, 0.0])
    cases = {  # degenerate pairs
        "antiparallel": ([[1.0, 0.0], [-1.0, 0.0]], [50.0, 51.0]),
        "duplicate": ([[1.0, 0.0], [1.0, 0.0]], [1.0, 0.0]),
        "zero_primary": ([[0.0, 0.0], [1.0, 0.0]], [0.0, 0.0]),
    }
    for name, (Jc, expected) in cases.items():
        Jc = jnp.asarray(Jc)
        w, _ = weights_step(agg, Jc, agg.init(Jc))
        assert rel(w, expected) < 1e-7, name
    row = jnp.array([[1.0, 2.0, 3.0]])
    w, _ = weights_step(agg, row, agg.init(row))
    assert np.array_equal(w, [1.0])


def test_pcd_infeasible_constraints_give_primary():
    # Two anti-parallel secondary gradients cannot both be improved: output g1 (w = e1).
    G = jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, -1.0], [0.0, -1.0, 1.0]])
    assert np.array_equal(pcd_solve(G, jnp.full((2,), 0.5)), [1.0, 0.0, 0.0])


def test_pcd_kkt(getkey):
    # The solver's result is the QP's KKT point: feasible, mu >= 0, complementary.
    keys = jr.split(getkey(), 4)
    kinds = {
        "gaussian": jr.normal(keys[0], (5, 7)),
        "conflicting": jr.normal(keys[1], (5, 7)) - 2 * jnp.asarray(J_5X7[:1]),
        "low_rank": jr.normal(keys[2], (5, 2)) @ jr.normal(keys[3], (2, 7)),
        "5x7": -jnp.asarray(J_5X7),
    }
    active = 0
    for name, J in kinds.items():
        G = J @ J.T
        for tau in (0.02, 0.3, 1.0):
            q = pcd_solve(G, jnp.full((4,), tau))
            slack = (G @ q)[1:] - tau * jnp.diagonal(G)[1:]
            scale = jnp.max(jnp.diagonal(G))
            if np.all(q[1:] == 0) and np.any(slack < -1e-8 * scale):
                continue  # infeasible constraints: dropped, as TorchJD
            assert q[0] == 1 and jnp.all(q[1:] >= 0), name
            assert jnp.all(slack >= -1e-8 * scale), (name, tau)
            assert jnp.abs(jnp.dot(q[1:], slack)) <= 1e-8 * scale * jnp.sum(q), name
            active += int(np.any(q[1:] > 0))
    assert active >= 4


def test_pcd_nan_leaves_state_untouched():
    agg = arrays(eqxjd.PCD())
    J = jnp.asarray(J_BASE)
    _, state = weights_step(agg, J, agg.init(J))
    w, new_state = weights_step(agg, J.at[0, 0].set(jnp.nan), state)
    assert np.all(np.isnan(w))
    assert eqx.tree_equal(state, new_state)


def test_pcd_tau_validation():
    for bad in (-0.1, 1.5, jnp.array([0.1, 2.0]), jnp.ones((2, 2)) * 0.1):
        with pytest.raises((TypeError, ValueError)):
            eqxjd.PCD(tau=bad)
    agg = eqxjd.PCD(tau=jnp.array([0.1, 0.2]))
    J = jnp.asarray(J_BASE)
    with pytest.raises(ValueError, match="secondary"):
        agg(J, agg.init(J))


def test_excess_mtl_published_values():
    published = {  # TorchJD 0.18.0: two calls on the same matrix
        "base": [[0.1192029216, 0.8807970784], [0.1192029215, 0.8807970785]],
        "5x7": [
            [0.8381243874, 0.00201094436, 0.04249256976, 0.0433663033, 0.07400579516],
            [0.8381243821, 0.002010944695, 0.04249257063, 0.04336630626, 0.07400579636],
        ],
    }
    for name, refs in published.items():
        J = jnp.asarray(J_BASE if name == "base" else J_5X7)
        outs, _ = run_sequence(eqxjd.ExcessMTL(), [J, J], weights=True)
        for w, ref in zip(outs, refs):
            assert rel(w, ref) < 1e-8
    outs, _ = run_sequence(eqxjd.ExcessMTL(), [J_BASE], weights=True)
    d = outs[0] @ J_BASE
    assert rel(d, [4.807970784, 1, 1]) < 1e-9


def test_excess_mtl_warmup_and_state():
    agg = arrays(eqxjd.ExcessMTL(n_warmup_steps=2))
    Js = [jnp.asarray(J) for J in SEQS["s5"]]
    state = agg.init(Js[0])
    for J in Js[:2]:
        w, state = weights_step(agg, J, state)
        assert np.array_equal(w, np.full(5, 0.2))
    w, state = weights_step(agg, Js[2], state)
    assert not np.allclose(w, 0.2) and np.isclose(np.sum(w), 1)
    assert bool(state.has_baseline) and int(state.n_steps) == 3
    # The state holds an m x n array: another n is rejected too.
    with pytest.raises(ValueError, match="init"):
        agg(jnp.zeros((5, 6)), state)
    # Zero Jacobian: uniform weights.
    Z = jnp.zeros((3, 4))
    outs, _ = run_sequence(eqxjd.ExcessMTL(), [Z, Z], weights=True)
    assert np.allclose(outs[1], 1 / 3)


def test_crmogm_published_and_limits():
    J = jnp.asarray(J_BASE)
    # TorchJD 0.18.0: CRMOGM(MGDA, alpha=0.5) = MGDA on both calls when the input does
    # not change.
    agg = eqxjd.StatefulWeightedAggregator(
        eqxjd.CRMOGMWeighting(eqxjd.MGDAWeighting(), alpha=0.5)
    )
    outs, state = run_sequence(agg, [J, J], weights=True)
    for w in outs:
        assert rel(w, [0.6, 0.4]) < 1e-12
    assert state.inner is None
    # alpha = 0 returns the wrapped weights; alpha = 1 freezes the initial weights.
    stats = [jnp.asarray(Jk @ Jk.T) for Jk in SEQS["s5"]]
    outs, _ = run_sequence(
        eqxjd.CRMOGMWeighting(eqxjd.MGDAWeighting(), alpha=0.0), stats
    )
    for k, w in enumerate(outs):
        assert rel(w, call(eqxjd.MGDAWeighting(), stats[k])) < 1e-15
    init = jnp.array([0.1, 0.2, 0.3, 0.2, 0.2])
    frozen = eqxjd.CRMOGMWeighting(
        eqxjd.MGDAWeighting(), alpha=1.0, initial_weights=init
    )
    outs, _ = run_sequence(frozen, stats)
    for w in outs:
        assert np.array_equal(w, init)


def test_crmogm_errors_and_differentiability():
    wrapped = eqxjd.CRMOGMWeighting(eqxjd.MeanWeighting(), alpha=0.5)
    with pytest.raises(ValueError, match="alpha"):
        eqxjd.CRMOGMWeighting(eqxjd.MeanWeighting(), alpha=1.5)
    with pytest.raises((TypeError, ValueError)):
        eqxjd.CRMOGMWeighting(eqxjd.MeanWeighting(), initial_weights=jnp.ones((2, 2)))
    with pytest.raises(ValueError, match="initial_weights"):
        eqxjd.CRMOGMWeighting(eqxjd.MeanWeighting(), initial_weights=jnp.ones(3)).init(
            jnp.zeros((2, 2))
        )
    state = wrapped.init(jnp.zeros((2, 2)))
    with pytest.raises(ValueError, match="number of objectives"):
        wrapped(jnp.zeros((3, 3)), state)
    # Differentiable iff the wrapped weighting is.
    assert wrapped.differentiable
    assert not eqxjd.CRMOGMWeighting(eqxjd.GradVacWeighting()).differentiable
    assert not eqxjd.CRMOGMWeighting(eqxjd.PCDWeighting()).differentiable
    J = jnp.asarray(J_5X7)
    init = jnp.array([0.5, 0.1, 0.1, 0.2, 0.1])

    def loss(J, weighting):
        agg = eqxjd.StatefulWeightedAggregator(weighting)
        d, _ = agg(J, agg.init(J))
        return jnp.sum(d**2)

    diff = eqxjd.CRMOGMWeighting(eqxjd.ConstantWeighting(jnp.arange(5.0)), 0.5, init)
    grad = jax.grad(loss)(J, diff)
    w = 0.5 * init + 0.5 * jnp.arange(5.0)
    assert rel(grad, 2 * jnp.outer(w, w @ J)) < 1e-14
    nd = eqxjd.CRMOGMWeighting(eqxjd.ExcessMTLWeighting(), 0.5, init)
    assert np.all(jax.grad(loss)(J, nd) == 0)


# ------------------------------------------------------------------------------------
# MoDo and SDMGrad

CROSS_CONFIGS = {
    "modo": lambda m: eqxjd.MoDoWeighting(),
    "modo_g0.5_r0": lambda m: eqxjd.MoDoWeighting(gamma=0.5, rho=0.0),
    "sdmgrad": lambda m: eqxjd.SDMGradWeighting(),
    "sdmgrad_custom": lambda m: eqxjd.SDMGradWeighting(
        lr=1.0,
        momentum=0.9,
        n_iter=5,
        lambda_=0.6,
        pref_vector=jnp.array([0.1, 0.2, 0.3, 0.2, 0.2] if m == 5 else [0.25, 0.75]),
    ),
}


def test_cross_batch_published_values():
    published = {  # TorchJD 0.18.0: two calls on the Gramian
        ("modo", "base"): [[1, 0], [0, 1]],
        ("sdmgrad", "base"): [[0.1153846154, 0.8846153846]] * 2,
        ("modo", "5x7"): [
            [0, 0.474080769, 0.206191877, 0.2158484194, 0.1038789347],
            [0, 0.5411466286, 0.1137755798, 0.2318421591, 0.1132356325],
        ],
        ("sdmgrad", "5x7"): [
            [0.04615384615, 0.04615384615, 0.04615384615, 0.04615384615, 0.8153846154],
            [0.04615384615, 0.4367646275, 0.04615384615, 0.4247738341, 0.04615384615],
        ],
    }
    for (name, matrix), refs in published.items():
        J = J_BASE if matrix == "base" else J_5X7
        G = jnp.asarray(J @ J.T)
        outs, _ = run_sequence(CROSS_CONFIGS[name](J.shape[0]), [G, G])
        for w, ref in zip(outs, refs):
            np.testing.assert_allclose(w, ref, rtol=1e-8, atol=1e-10)
    # SDMGrad cases small enough to check by hand (n_iter = 1), as in TorchJD 0.18.0.
    M1, M2 = jnp.diag(jnp.array([1.0, 0.25, 0.0])), jnp.eye(3)
    outs, _ = run_sequence(eqxjd.SDMGradWeighting(n_iter=1), [M1, M2])
    np.testing.assert_allclose(outs[0], np.array([1, 1, 11]) / 13, rtol=1e-12)
    np.testing.assert_allclose(outs[1], np.array([6, 6, 1]) / 13, rtol=1e-12)
    pref = eqxjd.SDMGradWeighting(n_iter=1, pref_vector=jnp.array([0.0, 0.0, 1.0]))
    np.testing.assert_allclose(run_sequence(pref, [M1])[0][0], [0, 0, 1], atol=1e-15)


def test_cross_batch_errors():
    with pytest.raises(ValueError, match="pref_vector"):
        eqxjd.SDMGradWeighting(pref_vector=jnp.ones((2, 2)))
    sdm = eqxjd.SDMGradWeighting(pref_vector=jnp.ones(3))
    M = jnp.eye(2)
    with pytest.raises(ValueError, match="pref_vector"):
        sdm(M, sdm.init(M))
    with pytest.raises((TypeError, ValueError)):
        eqxjd.MoDoWeighting().init(jnp.zeros((2, 3)))


@pytest.mark.parametrize(
    "cls,kwargs",
    [
        (eqxjd.FairGrad, dict(alpha=-1.0)),
        (eqxjd.FairGrad, dict(alpha=1.0, max_iters=0)),
        (eqxjd.FairGradWeighting, dict(alpha=jnp.ones(2))),
        (eqxjd.GradVac, dict(beta=1.5)),
        (eqxjd.GradVac, dict(beta=-0.1)),
        (eqxjd.GradVac, dict(eps=-1e-8)),
        (eqxjd.PCD, dict(beta=1.0)),
        (eqxjd.PCD, dict(eps=-1.0)),
        (eqxjd.PCD, dict(tau=1.01)),
        (eqxjd.ExcessMTL, dict(robust_step_size=0.0)),
        (eqxjd.ExcessMTL, dict(n_warmup_steps=-1)),
        (eqxjd.CRMOGMWeighting, dict(weighting=eqxjd.MeanWeighting(), alpha=-0.1)),
        (eqxjd.MoDoWeighting, dict(gamma=0.0)),
        (eqxjd.MoDoWeighting, dict(rho=-0.1)),
        (eqxjd.SDMGradWeighting, dict(lr=0.0)),
        (eqxjd.SDMGradWeighting, dict(momentum=1.0)),
        (eqxjd.SDMGradWeighting, dict(n_iter=0)),
        (eqxjd.SDMGradWeighting, dict(lambda_=-0.3)),
    ],
)
def test_bad_hyperparameters_raise(cls, kwargs):
    with pytest.raises((TypeError, ValueError)):
        cls(**kwargs)


def test_boundary_hyperparameters_are_accepted():
    eqxjd.FairGrad(0.0)
    eqxjd.GradVac(beta=0.0, eps=0.0)
    eqxjd.GradVac(beta=1.0)
    eqxjd.PCD(tau=0.0, beta=0.0, eps=0.0)
    eqxjd.PCD(tau=jnp.array([0.0, 1.0]))
    eqxjd.CRMOGMWeighting(eqxjd.MeanWeighting(), alpha=1.0)
    eqxjd.MoDoWeighting(rho=0.0)
    eqxjd.SDMGradWeighting(momentum=0.0, lambda_=0.0)


def test_bad_inputs_raise():
    for agg in (eqxjd.FairGrad(1.0),):
        with pytest.raises((TypeError, ValueError)):
            agg(jnp.zeros(3))
    gv = eqxjd.GradVacWeighting()
    with pytest.raises((TypeError, ValueError)):
        gv.init(jnp.zeros((2, 3)))
    with pytest.raises((TypeError, ValueError)):
        eqxjd.ExcessMTL().init(jnp.zeros(3))
