"""FairGrad and NashMTL, the two methods built on the Nash root `w * (G w) = 1`
(NashMTL without clipping is FairGrad with alpha = 1): TorchJD 0.18.0 published values,
special and degenerate cases, the root itself, NashMTL's state and hyperparameter
checks."""

import equinox as eqx
import eqxjd
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from eqxjd._aggregation.nash_mtl import nash_root

from .helpers import (
    load_reference,
    nash_step,
    nash_weights,
    rel_err,
    small_kinds,
)


ZOO = load_reference("zoo")
J_BASE = jnp.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
J_5X7 = jnp.asarray(ZOO["J/5x7"])


def _gramian(J):
    return jnp.matmul(J, J.T, precision=jax.lax.Precision.HIGHEST)


def test_nash_mtl_published_values():
    agg = eqxjd.NashMTL(n_tasks=2)
    w, _ = nash_weights(agg, J_BASE, agg.init(J_BASE))
    assert rel_err(w @ J_BASE, [0.05415325109, 0.7060691982, 0.7060691982]) < 1e-7
    # Unclipped weights (max_norm=0) are the Nash root = FairGrad(alpha=1);
    # TorchJD 0.18.0 (torch 2.13, float64):
    # NashMTL(n_tasks=5, max_norm=0.0).weighting(J_5x7). An array max_norm is
    # traced: no recompilation.
    agg = eqxjd.NashMTL(n_tasks=5, max_norm=jnp.array(0.0))
    w, _ = nash_weights(agg, J_5X7, agg.init(J_5X7))
    expected = [0.14518431004176374, 0.8701013658251033, 0.2782601928066293,
                0.3645116758455724, 0.2999443430431605]  # fmt: skip
    assert rel_err(w, expected) < 1e-7
    fairgrad = [0.1451843099, 0.870101365, 0.2782601925, 0.3645116755, 0.2999443427]
    assert rel_err(w, fairgrad) < 1e-8  # TorchJD 0.18.0 FairGrad(alpha=1)
    # TorchJD 0.18.0 (torch 2.13, float64):
    # NashMTL(n_tasks=2, max_norm=0.5).weighting(J_base).
    agg = eqxjd.NashMTL(n_tasks=2, max_norm=jnp.array(0.5))
    w, _ = nash_weights(agg, J_BASE, agg.init(J_BASE))
    assert rel_err(w, [0.20911309691628038, 0.1439215022018758]) < 1e-7


def test_nash_mtl_update_weights_every():
    # TorchJD 0.18.0 (torch 2.13, float64):
    # NashMTL(n_tasks=m, update_weights_every=2).weighting(J_k), k = 0, 1, 2.
    expected = {
        0: [[0.23324778914842342, 0.28182167576987943],
            [0.23516508518142606, 0.284138248985602],
            [0.20329709421094977, 0.19832614841563873]],
        2: [[0.18588428530071757, 0.1384224196247978, 0.09887056238653048,
             0.10456725742742407, 0.08976995371535934],
            [0.2517205485390741, 0.18744869875197295, 0.13388841427903173,
             0.14160275763104624, 0.12156456343257284],
            [0.3215235265220965, 0.29471372891307446, 0.1157399267010427,
             0.12924514536061987, 0.08944038093239536]],
    }  # fmt: skip
    for s, rows in expected.items():
        J0 = ZOO[f"nashmtl_seq/seq_{s}/J0"]
        agg = eqxjd.NashMTL(n_tasks=J0.shape[0], update_weights_every=2)
        state = agg.init(jnp.asarray(J0))
        alphas = []
        for k in range(3):
            w, state = nash_weights(agg, ZOO[f"nashmtl_seq/seq_{s}/J{k}"], state)
            alphas.append(state.alpha)
            assert rel_err(w, rows[k]) < 1e-6, (s, k)
        np.testing.assert_array_equal(alphas[0], alphas[1])  # call 1 reused call 0's
        assert not np.array_equal(alphas[1], alphas[2])


def test_nash_mtl_degenerate():
    # TorchJD 0.18.0 (torch 2.13, float64): two calls of a fresh NashMTL(n_tasks=2)
    # on each J (same d both times).
    cases = {
        ((0.0, 0.0), (0.0, 1.0)): [0.0, 1.0],  # no root: solver failure, alpha stays 1
        ((1.0, 0.0), (1.0, 0.0)): [1.0, 0.0],
        ((1.0, 0.0), (-1.0, 0.0)): [0.0, 0.0],
    }
    agg = eqxjd.NashMTL(n_tasks=2)
    for J, expected in cases.items():
        J = np.array(J)
        state = agg.init(jnp.asarray(J))
        for _ in range(2):
            w, state = nash_weights(agg, J, state)
            np.testing.assert_allclose(np.asarray(w) @ J, expected, atol=1e-12)
    # Zero and NaN Jacobians: TorchJD raises; eqxjd keeps the previous weights (ones
    # at first) without a hang, and does not poison the state.
    w, state = nash_weights(agg, np.zeros((2, 3)), agg.init(J_BASE))
    np.testing.assert_array_equal(w, jnp.ones(2))
    np.testing.assert_array_equal(state.alpha, jnp.ones(2))
    d, state = agg(jnp.zeros((2, 0)), agg.init(jnp.zeros((2, 0))))  # n = 0
    assert d.shape == (0,)
    _, state = nash_weights(agg, J_BASE, agg.init(J_BASE))
    good = state.alpha
    nan_J = np.asarray(J_BASE).copy()
    nan_J[:, 1] = np.nan
    w, state = nash_weights(agg, nan_J, state)
    np.testing.assert_array_equal(state.alpha, good)
    d = np.asarray(w) @ nan_J
    assert np.isnan(d[1]) and np.all(np.isfinite(d[[0, 2]]))
    # m = 1 (TorchJD raises): G_hat = [[1]] so alpha = 1 already meets TorchJD's
    # stopping rule and is kept; clipping then gives d = g / |g| for |g| > max_norm.
    row = jnp.array([[3.0, 4.0, 0.0, 0.0]])
    agg1 = eqxjd.NashMTL(n_tasks=1)
    w, state1 = nash_weights(agg1, row, agg1.init(row))
    np.testing.assert_allclose(w, [0.2], rtol=1e-14)
    np.testing.assert_array_equal(state1.alpha, jnp.ones(1))
    # Finite on the test kinds (several of them have no root).
    for kind, J in small_kinds().items():
        agg = eqxjd.NashMTL(n_tasks=J.shape[0])
        w, _ = nash_weights(agg, J, agg.init(J))
        assert bool(jnp.all(jnp.isfinite(w))), kind


def test_nash_root_scale_equivariant_and_exact():
    G = _gramian(J_5X7)
    root = jax.jit(nash_root)
    a, ok = root(G)
    assert bool(ok)
    np.testing.assert_allclose(a * (G @ a), jnp.ones(5), rtol=1e-13)
    for s in (1e-6, 1e6):
        b, ok = root(s**2 * G)
        assert bool(ok)
        np.testing.assert_allclose(b * s, a, rtol=1e-12)
    _, ok = root(jnp.diag(jnp.array([0.0, 1.0, 1.0, 1.0, 1.0])))  # zero row: no root
    assert not bool(ok)


def test_nash_mtl_state_in_a_jitted_loop_and_float32():
    # `update_weights_every=2` alternates solving and reusing inside one trace.
    agg = eqxjd.NashMTL(n_tasks=5, update_weights_every=2)

    @eqx.filter_jit
    @eqx.debug.assert_max_traces(max_traces=1)
    def step(a, J, state):
        return a(J, state)

    state = agg.init(J_5X7)
    structure = jax.tree.structure(state)
    ds = []
    for k in range(4):
        d, state = step(agg, J_5X7 * (1.0 + 0.5 * k), state)
        ds.append(d)
        assert jax.tree.structure(state) == structure
    assert int(state.step) == 4

    # float32 in -> float32 out (solved in float64); TorchJD 0.18.0 float32 value.
    J32 = J_5X7.astype(jnp.float32)
    agg = eqxjd.NashMTL(n_tasks=5)
    w32, _ = nash_step(agg, J32, agg.init(J32))
    assert w32.dtype == jnp.float32
    expected = [0.0649284, 0.38912117, 0.12444174, 0.1630146, 0.13413917]
    np.testing.assert_allclose(w32, expected, rtol=0, atol=1e-4)


def test_nash_mtl_bad_input():
    for kwargs in (
        {"n_tasks": 0},
        {"n_tasks": 2, "max_norm": -1.0},
        {"n_tasks": 2, "update_weights_every": 0},
        {"n_tasks": 2, "optim_niter": 0},
    ):
        with pytest.raises((TypeError, ValueError)):
            eqxjd.NashMTL(**kwargs)
    agg = eqxjd.NashMTL(n_tasks=3)
    with pytest.raises((TypeError, ValueError), match="n_tasks"):
        agg.init(J_BASE)
    state = eqxjd.NashMTL(n_tasks=2).init(J_BASE)
    with pytest.raises((TypeError, ValueError), match="n_tasks"):
        agg(J_BASE, state)
    with pytest.raises((TypeError, ValueError)):
        eqxjd.NashMTL(n_tasks=3)(jnp.ones((3, 2)), state)  # state for 2 objectives
    with pytest.raises((TypeError, ValueError)):
        eqxjd.NashMTL(n_tasks=2)(jnp.ones(3), state)


def rel(x, y):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return float(np.max(np.abs(x - y)) / max(np.max(np.abs(y)), 1e-300))


def arrays(module):
    """Float hyperparameters as 0-d arrays, so that `eqx.filter_jit` traces them
    (different configurations then share one compilation)."""
    return jax.tree_util.tree_map(
        lambda x: jnp.asarray(x, jnp.float64) if isinstance(x, float) else x, module
    )


@eqx.filter_jit
def call(method, stat, key=None):
    return method(stat, key=key)


def test_fairgrad_published_values():
    # TorchJD 0.18.0 on J_base and J_5x7 (FairGrad(alpha=1) on J_base is in TorchJD's
    # own table of values).
    published = {
        (1.0, "base"): (
            [0.5914611522, 0.4070714829],
            [0.07658428839, 0.9985326351, 0.9985326351],
        ),
        (2.0, "base"): (
            [0.4713629223, 0.3194542282],
            [0.03127367982, 0.7908171505, 0.7908171505],
        ),
        (1.0, "5x7"): (
            [0.1451843099, 0.870101365, 0.2782601925, 0.3645116755, 0.2999443427],
            [
                0.9459261407,
                0.8169569044,
                0.6910502349,
                1.334367432,
                0.827200179,
                -0.2948154767,
                -0.6391728881,
            ],
        ),
        (2.0, "5x7"): (
            [0.04220285718, 0.8442548204, 0.1740032534, 0.2968946649, 0.2623194361],
            [
                0.6200312962,
                0.6298930425,
                0.4682308097,
                0.9535607871,
                0.6963916338,
                -0.05336554115,
                -0.448245374,
            ],
        ),
    }
    for (alpha, name), (w_ref, d_ref) in published.items():
        J = J_BASE if name == "base" else J_5X7
        w = call(arrays(eqxjd.FairGradWeighting(alpha)), jnp.asarray(J @ J.T))
        assert rel(w, w_ref) < 1e-8
        assert rel(np.asarray(w) @ J, d_ref) < 1e-8


def fairgrad(alpha, J):
    """FairGrad's weights and aggregation, through one shared jitted function."""
    J = jnp.asarray(J)
    w = call(arrays(eqxjd.FairGradWeighting(alpha)), J @ J.T)
    return w, w @ J


def test_fairgrad_special_cases():
    # alpha = 0: uniform weights (linear scalarisation).
    w, _ = fairgrad(0.0, J_5X7)
    assert np.array_equal(w, np.full(5, 0.2))
    # m = 1: the row scaled by |g|^(-2 alpha / (alpha + 1)) (alpha = 1: unit norm).
    _, d = fairgrad(1.0, [[1.0, 2.0, 3.0]])
    assert rel(d, [0.2672612419, 0.5345224838, 0.8017837257]) < 1e-9
    _, d = fairgrad(3.0, [[1.0, 2.0, 3.0]])
    assert rel(d, np.array([1.0, 2.0, 3.0]) * 14.0 ** (-0.75)) < 1e-12
    # Zero rows get weight 0 (documented extension); the others solve their own system.
    w, _ = fairgrad(1.0, np.concatenate([J_BASE, np.zeros((3, 3))])[:5])
    assert np.all(w[2:] == 0) and rel(w[:2], [0.5914611522, 0.4070714829]) < 1e-8
    # Zero matrix: zero weights and aggregation.
    w, d = fairgrad(2.0, np.zeros((5, 7)))
    assert np.all(w == 0) and np.all(d == 0)
    # m = 0 and non-finite input.
    assert eqxjd.FairGradWeighting(1.0)(jnp.zeros((0, 0))).shape == (0,)
    w, _ = fairgrad(1.0, np.full((5, 7), np.nan))
    assert np.all(np.isnan(w))


def test_fairgrad_non_conflicting_and_root(getkey):
    # At the root, J d = G w = w^(-1/alpha) > 0: FairGrad never conflicts.
    key1, key2 = jr.split(getkey())
    kinds = {
        "gaussian": jr.normal(key1, (5, 7)),
        "wide": jr.normal(key2, (5, 12)),
        "scaled": 1e6 * jnp.asarray(J_5X7),
        "tiny": 1e-6 * jnp.asarray(J_5X7),
    }
    for name, J in kinds.items():
        for alpha in (0.1, 1.0, 2.0):
            w, d = fairgrad(alpha, J)
            assert jnp.all(w > 0), (name, alpha)
            assert jnp.all(J @ d > 0), (name, alpha)
            target = w ** (-1 / alpha)
            assert rel(J @ d, target) < 1e-8, (name, alpha)


def test_fairgrad_max_iters_truncates():
    J = jnp.asarray(J_5X7)
    w1 = call(arrays(eqxjd.FairGradWeighting(1.0, max_iters=1)), J @ J.T)
    assert w1.shape == (5,) and jnp.all(jnp.isfinite(w1))
    full = call(arrays(eqxjd.FairGradWeighting(1.0)), J @ J.T)
    assert rel(w1, full) > 1e-6
