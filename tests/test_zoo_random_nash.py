"""PCGrad, Random, GradDrop and NashMTL (issue 3): TorchJD 0.18.0 parity, randomness,
state, jit/vmap, dtypes, bad input, gradients and degenerate inputs.

Reference values come from tests/reference/zoo.npz (TorchJD 0.18.0, float64, with the
random draws stored under `<method>/<name>/draws`) and from methods.md §9. Numbers
marked "torchvenv" were produced with TorchJD 0.18.0 / torch 2.13 (float64) by the
snippet quoted next to them.
"""

import equinox as eqx
import eqxjd
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from eqxjd._aggregation.graddrop import graddrop
from eqxjd._aggregation.nash_mtl import nash_root
from eqxjd._aggregation.pcgrad import pcgrad_permutations, pcgrad_weights
from eqxjd._aggregation.random import random_weights

from .helpers import (
    finite_difference_jvp,
    gaussian,
    load_reference,
    low_rank,
    rel_err,
    strongly_stationary,
)


ZOO = load_reference("zoo")
J_BASE = jnp.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
J_5X7 = jnp.asarray(ZOO["J/5x7"])


def _names(method):
    prefix = f"{method}/"
    return sorted({k.split("/")[1] for k in ZOO if k.startswith(prefix)})


def _d_err(d, ref, w, J):
    """Error of an aggregation relative to the scale of its terms (sum_i |w_i| |g_i|):
    cancellations (e.g. d ~ 1e-17 on a stationary J) are rounding noise."""
    scale = float(jnp.max(jnp.abs(w) @ jnp.abs(J)))
    return float(np.max(np.abs(np.asarray(d) - ref), initial=0.0)) / max(scale, 1e-300)


def _gramian(J):
    return jnp.matmul(J, J.T, precision=jax.lax.Precision.HIGHEST)


# Compilation dominates this file's runtime, so the fixtures are zero-padded to a few
# shapes (padding is exact: a zero row or column changes nothing in PCGrad/GradDrop,
# a -inf draw adds a zero softmax weight, and zero columns leave G unchanged).
_pcgrad_core = jax.jit(pcgrad_weights)
_graddrop_core = jax.jit(graddrop)
_random_core = jax.jit(random_weights)


def _kinds():
    """Degenerate and hard Jacobians (helpers.jacobian_kinds minus a few shapes, to
    limit compilations; its `conflicting` builder trips rank_promotion='raise')."""
    keys = jr.split(jr.key(0), 4)
    direction = jr.normal(keys[2], (5,))
    signs = jnp.array([1.0, -1.0, 1.0, -1.0, -1.0, 1.0])
    return {
        "gaussian": gaussian(keys[0], 5, 7),
        "low_rank": low_rank(keys[1], 8, 10, 2, spread=100.0),
        "conflicting": signs[:, None] * direction[None, :]
        + 0.05 * jr.normal(keys[3], (6, 5)),
        "stationary": strongly_stationary(keys[3], 6, 8, 3),
        "single": gaussian(keys[0], 1, 3),
        "zero": jnp.zeros((5, 7)),
    }


def _max_shape(method):
    shapes = [ZOO[f"J/{name}"].shape for name in _names(method)]
    return max(s[0] for s in shapes), max(s[1] for s in shapes)


def _pad(x, shape, value=0.0):
    x = np.asarray(x)
    return np.pad(
        x, [(0, t - s) for s, t in zip(x.shape, shape)], constant_values=value
    )


@eqx.filter_jit
def _run(agg, J, key):
    weights = agg.weights(J, key=key) if hasattr(agg, "weights") else None
    return weights, agg(J, key=key)


# ------------------------------------------------------------------------ PCGrad


def test_pcgrad_reference_fixtures():
    worst = 0.0
    M, _ = _max_shape("pcgrad")
    for name in _names("pcgrad"):
        J = ZOO[f"J/{name}"]
        m = J.shape[0]
        # Padded rows/orders (indices >= m) hit zero rows of G: no projection.
        perms = np.concatenate(
            [ZOO[f"pcgrad/{name}/draws"], np.arange(m, M)[None].repeat(m, 0)], 1
        )
        perms = np.concatenate([perms, np.arange(M)[None].repeat(M - m, 0)], 0)
        w = np.asarray(
            _pcgrad_core(jnp.asarray(_pad(J @ J.T, (M, M))), jnp.asarray(perms))
        )[:m]
        d = w @ J
        worst = max(worst, rel_err(w, ZOO[f"pcgrad/{name}/w"]))
        worst = max(worst, _d_err(d, ZOO[f"pcgrad/{name}/d"], w, J))
    assert worst < 1e-9, worst


def test_pcgrad_published_values():
    # methods.md §9.3 / §9.6: J_5x7 with TorchJD's permutations.
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


def test_pcgrad_m2_equals_torchjd_for_any_key():
    # With two rows the projection order is irrelevant: any key gives TorchJD's values.
    for name in ["base"] + [n for n in _names("pcgrad") if n.startswith("pair")]:
        J = ZOO[f"J/{name}"]
        for seed in (0, 1):
            w, d = _run(eqxjd.PCGrad(), jnp.asarray(_pad(J, (2, 102))), jr.key(seed))
            np.testing.assert_allclose(w, ZOO[f"pcgrad/{name}/w"], rtol=1e-13, atol=0)
            ref = ZOO[f"pcgrad/{name}/d"]
            assert _d_err(d[: J.shape[1]], ref, w, J) < 1e-14
    # methods.md §9.2 (published): [0.5847953216, 3.801169591, 3.801169591].
    _, d = _run(eqxjd.PCGrad(), jnp.asarray(_pad(J_BASE, (2, 102))), jr.key(5))
    assert rel_err(d[:3], [0.5847953216, 3.801169591, 3.801169591]) < 1e-9


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
    w, d = _run(agg, jnp.zeros((0, 3)), key)
    assert w.shape == (0,)
    np.testing.assert_array_equal(d, jnp.zeros(3))
    w, d = _run(agg, jnp.zeros((5, 7)), key)  # zero J: w = 1, d = 0
    np.testing.assert_array_equal(w, jnp.ones(5))
    np.testing.assert_array_equal(d, jnp.zeros(7))
    w, d = _run(agg, jnp.array([[1.0, 2.0, 3.0]]), key)
    np.testing.assert_array_equal(d, jnp.array([1.0, 2.0, 3.0]))
    w, d = _run(agg, jnp.asarray(_pad([[1.0, 0.0], [-1.0, 0.0]], (2, 102))), key)
    np.testing.assert_array_equal(w, jnp.array([2.0, 2.0]))  # anti-parallel (§4.8)
    np.testing.assert_array_equal(d, jnp.zeros(102))
    # A NaN column makes the whole Gramian NaN: NaN weights, so an all-NaN update.
    # (TorchJD's comparisons with NaN fail, so it skips every projection and returns
    # the plain row sum outside the NaN column: a finite but meaningless update.)
    w, d = _run(agg, J_5X7.at[:, 2].set(jnp.nan), key)
    assert bool(jnp.all(jnp.isnan(w))) and bool(jnp.all(jnp.isnan(d)))


# ------------------------------------------------------------------------ Random


def test_random_reference_fixtures():
    worst = 0.0
    M, _ = _max_shape("random")
    for name in _names("random"):
        J = ZOO[f"J/{name}"]
        draws = _pad(ZOO[f"random/{name}/draws"], (M,), -np.inf)
        w = np.asarray(_random_core(jnp.asarray(draws)))[: J.shape[0]]
        worst = max(worst, rel_err(w, ZOO[f"random/{name}/w"]))
        worst = max(worst, _d_err(w @ J, ZOO[f"random/{name}/d"], w, J))
    assert worst < 1e-12, worst
    # methods.md §9.2 (published): d = [-2.622880285, 1, 1], w = [0.8622880285, ...].
    w = random_weights(jnp.array([1.5409961082440433, -0.2934289057609464]))
    assert rel_err(w, [0.8622880285, 0.1377119715]) < 1e-9
    assert rel_err(w @ J_BASE, [-2.622880285, 1, 1]) < 1e-9


def test_random_weights_from_key():
    key = jr.key(3)
    w = eqxjd.RandomWeighting()(J_5X7, key=key)
    np.testing.assert_allclose(
        w, jax.nn.softmax(jr.normal(key, (5,), jnp.float64)), rtol=1e-15
    )
    assert bool(jnp.all(w > 0)) and abs(float(jnp.sum(w)) - 1) < 1e-14
    # It reads only the number of rows: a Gramian gives the same weights.
    np.testing.assert_array_equal(eqxjd.RandomWeighting()(_gramian(J_5X7), key=key), w)
    _, d = _run(eqxjd.Random(), jnp.zeros((0, 4)), key)
    np.testing.assert_array_equal(d, jnp.zeros(4))


def test_random_is_differentiable():
    key = jr.key(1)
    J = jr.normal(jr.key(2), (4, 5))
    T = jr.normal(jr.key(3), (4, 5))
    fn = lambda x: eqxjd.Random()(x, key=key)
    _, jvp = jax.jvp(fn, (J,), (T,))
    fd = finite_difference_jvp(fn, (J,), (T,))
    np.testing.assert_allclose(jvp, fd, rtol=1e-7, atol=1e-9)
    assert float(jnp.abs(jvp).max()) > 0.0


# ------------------------------------------------------------------------ GradDrop


def test_graddrop_reference_fixtures():
    worst = 0.0
    M, N = _max_shape("graddrop")
    for name in _names("graddrop"):
        J = ZOO[f"J/{name}"]
        u = _pad(ZOO[f"graddrop/{name}/draws"], (N,), 0.5)
        d = np.asarray(_graddrop_core(jnp.asarray(_pad(J, (M, N))), jnp.asarray(u)))
        d = d[: J.shape[1]]
        worst = max(
            worst, _d_err(d, ZOO[f"graddrop/{name}/d"], jnp.ones(J.shape[0]), J)
        )
    assert worst < 1e-12, worst


def test_graddrop_published_leak_and_float32():
    u = jnp.array([0.9700530018065531, 0.707819864399788, 0.45938294312745087,
                   0.9207476841219603, 0.6450241201227648, 0.7911478921803037,
                   0.17860617520075095])  # fmt: skip
    expected = [-0.1513572083, 3.067626505, 3.038362985, 5.032853914, -2.342151422,
                -3.812170087, 1.071763434]  # fmt: skip
    assert rel_err(_graddrop_core(J_5X7, u), expected) < 1e-9
    d = _graddrop_core(J_BASE, u[:3])
    np.testing.assert_array_equal(d, jnp.array([-4.0, 2.0, 2.0]))
    for name in ("base", "5x7"):
        J = jnp.asarray(ZOO[f"J/{name}"])
        leak = jnp.asarray(ZOO[f"graddrop_leak/{name}/leak"])
        d = _graddrop_core(
            J, jnp.asarray(ZOO[f"graddrop_leak/{name}/draws"]), leak=leak
        )
        assert rel_err(d, ZOO[f"graddrop_leak/{name}/d"]) < 1e-12
        J32 = J.astype(jnp.float32)
        u32 = jnp.asarray(ZOO[f"graddrop_f32/{name}/draws"], jnp.float32)
        d32 = _graddrop_core(J32, u32)
        assert d32.dtype == jnp.float32
        np.testing.assert_allclose(
            d32, ZOO[f"graddrop_f32/{name}/d"], rtol=1e-6, atol=1e-6
        )
    # methods.md §9.2: GradDrop(leak=[0.5, 0.2]) on J_base with the float64 draws.
    d = _graddrop_core(J_BASE, u[:3], leak=jnp.array([0.5, 0.2]))
    np.testing.assert_allclose(d, [-2.8, 2.0, 2.0], rtol=1e-14)


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


# ------------------------------------------------ shared: keys, jit, vmap, dtypes, ND

RANDOM_AGGREGATORS = {
    "pcgrad": eqxjd.PCGrad(),
    "random": eqxjd.Random(),
    "graddrop": eqxjd.GradDrop(),
    "graddrop_leak": eqxjd.GradDrop(leak=jnp.full((5,), 0.25)),
}


@pytest.mark.parametrize("name", sorted(RANDOM_AGGREGATORS))
def test_random_aggregators_keys_jit_vmap_dtype(name):
    # One eager call (eager lax loops recompile at every call); the rest is jitted.
    agg = RANDOM_AGGREGATORS[name]
    J = J_5X7
    k1, k2 = jr.key(10), jr.key(11)
    out = agg(J, key=k1)
    assert out.shape == (7,) and out.dtype == jnp.float64
    np.testing.assert_allclose(_run(agg, J, k1)[1], out, rtol=1e-13, atol=1e-13)
    np.testing.assert_array_equal(_run(agg, J, k1)[1], _run(agg, J, k1)[1])
    others = [_run(agg, J, k)[1] for k in (k2, jr.key(12), jr.key(13))]
    assert any(not np.array_equal(o, out) for o in others)  # keys matter
    with pytest.raises(ValueError, match="key"):
        agg(J)

    @eqx.filter_jit
    @eqx.debug.assert_max_traces(max_traces=1)
    def run(a, x, k):
        return a(x, key=k)

    run(agg, J, k1)
    run(agg, 2.0 * J, k2)  # new values, new key: no retrace
    batch = jnp.stack([J, -J, 3.0 * J])
    keys = jr.split(k1, 3)
    batched = eqx.filter_vmap(lambda x, k: agg(x, key=k))(batch, keys)
    looped = jnp.stack([_run(agg, x, k)[1] for x, k in zip(batch, keys)])
    np.testing.assert_allclose(batched, looped, rtol=1e-13, atol=1e-13)
    out32 = _run(agg, J.astype(jnp.float32), k1)[1]
    assert out32.dtype == jnp.float32
    if name == "pcgrad":  # the draws of Random and GradDrop depend on the dtype
        np.testing.assert_allclose(out32, out, rtol=1e-4, atol=1e-4)
    if name != "pcgrad":
        return  # GradDrop's degenerate inputs: test_graddrop_special_cases
    for kind in ("conflicting", "zero", "single"):
        Jk = _kinds()[kind]
        assert bool(jnp.all(jnp.isfinite(_run(agg, Jk, k1)[1]))), kind


@pytest.mark.parametrize("name", ["pcgrad", "graddrop"])
def test_non_differentiable_give_zero_gradient(name):
    agg = RANDOM_AGGREGATORS[name]
    grad = jax.grad(lambda x: jnp.sum(agg(x, key=jr.key(0)) ** 2))(J_5X7)
    np.testing.assert_array_equal(grad, jnp.zeros_like(J_5X7))
    assert jnp.all(jnp.isfinite(grad))


def test_pcgrad_weighting_nd_and_bad_input():
    assert not eqxjd.PCGradWeighting.differentiable
    w = jax.grad(lambda g: jnp.sum(eqxjd.PCGradWeighting()(g, key=jr.key(0))))(
        _gramian(J_5X7)
    )
    np.testing.assert_array_equal(w, jnp.zeros((5, 5)))
    with pytest.raises((TypeError, ValueError)):
        eqxjd.PCGradWeighting()(jnp.ones((2, 3)), key=jr.key(0))
    with pytest.raises((TypeError, ValueError)):
        eqxjd.PCGrad()(jnp.ones(3), key=jr.key(0))
    with pytest.raises((TypeError, ValueError)):
        pcgrad_weights(_gramian(J_5X7), jnp.zeros((4, 5), jnp.int32))


# ------------------------------------------------------------------------ NashMTL

# Where TorchJD's ECOS solves were accurate (status "optimal"), its weights are the
# exact Nash root or, where no root exists, the fallback. The other fixtures are
# excluded (documented in NashMTL's docstring): ECOS "optimal_inaccurate" (krum,
# illcond_1/2/6/7/10, scaled x1e5), failures on tiny Jacobians (scaled x1e-10 -> ones)
# and ECOS artefacts on infeasible problems (mgtn_*, scaled_8/9).
NASH_OK = ["5x7", "base", "illcond_0", "illcond_5", "normal_1", "normal_2", "normal_3",
           "normal_4", "normal_5", "pair_0", "pair_1", "pair_2", "pair_3",
           "pair_antiparallel", "pair_duplicate", "scaled_14", "scaled_20", "scaled_26",
           "scaled_32", "scaled_7", "tm"]  # fmt: skip
# Number of columns every m x n Jacobian is zero-padded to (one compilation per m;
# zero columns leave G, hence the weights, unchanged).
NASH_N = {1: 4, 2: 27, 3: 12, 4: 3, 5: 7, 6: 8, 8: 100, 9: 11}


@eqx.filter_jit
def _nash(agg, J, state):
    return agg.weights(J, state)


def _nash_weights(agg, J, state):
    """Weights and new state of `agg` on J (padded to NASH_N columns)."""
    J = np.asarray(J)
    return _nash(agg, jnp.asarray(_pad(J, (J.shape[0], NASH_N[J.shape[0]]))), state)


def test_nash_mtl_reference_three_calls():
    worst = {}
    for name in NASH_OK:
        J = ZOO[f"J/{name}"]
        agg = eqxjd.NashMTL(n_tasks=J.shape[0])
        state = agg.init(jnp.asarray(J))
        for k in range(3):
            w, state = _nash_weights(agg, J, state)
            w = np.asarray(w)
            err = max(
                rel_err(w, ZOO[f"nashmtl/{name}/call{k}/w"]),
                _d_err(w @ J, ZOO[f"nashmtl/{name}/call{k}/d"], w, J),
            )
            worst[name] = max(worst.get(name, 0.0), err)
        assert int(state.step) == 3
    assert max(worst.values()) < 2e-3, worst
    tight = [n for n in NASH_OK if not n.startswith(("scaled", "tm", "illcond"))]
    assert max(worst[n] for n in tight) < 1e-6, worst


def test_nash_mtl_published_values():
    agg = eqxjd.NashMTL(n_tasks=2)
    w, _ = _nash_weights(agg, J_BASE, agg.init(J_BASE))
    assert rel_err(w @ J_BASE, [0.05415325109, 0.7060691982, 0.7060691982]) < 1e-7
    # Unclipped weights (max_norm=0) are the Nash root = FairGrad(alpha=1), §4.14;
    # torchvenv: NashMTL(n_tasks=5, max_norm=0.0).weighting(J_5x7). An array
    # max_norm is traced: no recompilation.
    agg = eqxjd.NashMTL(n_tasks=5, max_norm=jnp.array(0.0))
    w, _ = _nash_weights(agg, J_5X7, agg.init(J_5X7))
    expected = [0.14518431004176374, 0.8701013658251033, 0.2782601928066293,
                0.3645116758455724, 0.2999443430431605]  # fmt: skip
    assert rel_err(w, expected) < 1e-7
    fairgrad = [0.1451843099, 0.870101365, 0.2782601925, 0.3645116755, 0.2999443427]
    assert rel_err(w, fairgrad) < 1e-8  # FairGrad(alpha=1), methods.md §9.3
    # torchvenv: NashMTL(n_tasks=2, max_norm=0.5).weighting(J_base).
    agg = eqxjd.NashMTL(n_tasks=2, max_norm=jnp.array(0.5))
    w, _ = _nash_weights(agg, J_BASE, agg.init(J_BASE))
    assert rel_err(w, [0.20911309691628038, 0.1439215022018758]) < 1e-7


def test_nash_mtl_sequences():
    # Three different Jacobians through one state (fresh instance per sequence).
    worst = 0.0
    for s in range(4):
        J0 = ZOO[f"nashmtl_seq/seq_{s}/J0"]
        agg = eqxjd.NashMTL(n_tasks=J0.shape[0])
        state = agg.init(jnp.asarray(J0))
        for k in range(3):
            J = ZOO[f"nashmtl_seq/seq_{s}/J{k}"]
            w, state = _nash_weights(agg, J, state)
            w = np.asarray(w)
            if (s, k) == (1, 1):
                # Known deviation: TorchJD's linearised subproblem is unbounded here
                # (cvxpy status "unbounded"), so it keeps the previous weights; eqxjd
                # returns the Nash root of the new Jacobian (alpha * G alpha constant
                # after clipping).
                resid = w * ((J @ J.T) @ w)
                assert np.abs(resid / resid[0] - 1).max() < 1e-10
                assert rel_err(w, ZOO[f"nashmtl_seq/seq_{s}/call{k}/w"]) > 1e-2
                continue
            worst = max(worst, rel_err(w, ZOO[f"nashmtl_seq/seq_{s}/call{k}/w"]))
            worst = max(
                worst, _d_err(w @ J, ZOO[f"nashmtl_seq/seq_{s}/call{k}/d"], w, J)
            )
    assert worst < 1e-6, worst


def test_nash_mtl_update_weights_every():
    # torchvenv: NashMTL(n_tasks=m, update_weights_every=2).weighting(J_k), k = 0, 1, 2.
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
            w, state = _nash_weights(agg, ZOO[f"nashmtl_seq/seq_{s}/J{k}"], state)
            alphas.append(state.alpha)
            assert rel_err(w, rows[k]) < 1e-6, (s, k)
        np.testing.assert_array_equal(alphas[0], alphas[1])  # call 1 reused call 0's
        assert not np.array_equal(alphas[1], alphas[2])


def test_nash_mtl_degenerate():
    # torchvenv: two calls of a fresh NashMTL(n_tasks=2) on each J (same d both times).
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
            w, state = _nash_weights(agg, J, state)
            np.testing.assert_allclose(np.asarray(w) @ J, expected, atol=1e-12)
    # Zero and NaN Jacobians: TorchJD raises; eqxjd keeps the previous weights (ones
    # at first) without a hang, and does not poison the state.
    w, state = _nash_weights(agg, np.zeros((2, 3)), agg.init(J_BASE))
    np.testing.assert_array_equal(w, jnp.ones(2))
    np.testing.assert_array_equal(state.alpha, jnp.ones(2))
    d, state = agg(jnp.zeros((2, 0)), agg.init(jnp.zeros((2, 0))))  # n = 0
    assert d.shape == (0,)
    _, state = _nash_weights(agg, J_BASE, agg.init(J_BASE))
    good = state.alpha
    nan_J = np.asarray(J_BASE).copy()
    nan_J[:, 1] = np.nan
    w, state = _nash_weights(agg, nan_J, state)
    np.testing.assert_array_equal(state.alpha, good)
    d = np.asarray(w) @ nan_J
    assert np.isnan(d[1]) and np.all(np.isfinite(d[[0, 2]]))
    # m = 1 (TorchJD raises): G_hat = [[1]] so alpha = 1 already meets TorchJD's
    # stopping rule and is kept; clipping then gives d = g / |g| for |g| > max_norm.
    row = jnp.array([[3.0, 4.0, 0.0, 0.0]])
    agg1 = eqxjd.NashMTL(n_tasks=1)
    w, state1 = _nash_weights(agg1, row, agg1.init(row))
    np.testing.assert_allclose(w, [0.2], rtol=1e-14)
    np.testing.assert_array_equal(state1.alpha, jnp.ones(1))
    # Finite on the test kinds (several of them have no root).
    for kind, J in _kinds().items():
        agg = eqxjd.NashMTL(n_tasks=J.shape[0])
        w, _ = _nash_weights(agg, J, agg.init(J))
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


def test_nash_mtl_state_jit_vmap_float32_nd():
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
    # Eager agrees (one call: eager lax loops recompile at every call).
    d, eager_state = agg(J_5X7, agg.init(J_5X7))
    np.testing.assert_allclose(ds[0], d, rtol=1e-12)
    assert int(eager_state.step) == 1

    # vmap over a batch of Jacobians (and states).
    batch = jnp.stack([J_5X7, 2.0 * J_5X7, J_5X7[::-1]])
    agg = eqxjd.NashMTL(n_tasks=5)
    states = eqx.filter_vmap(agg.init)(batch)
    batched, _ = eqx.filter_vmap(agg.weights)(batch, states)
    looped = jnp.stack([_nash_weights(agg, J, agg.init(J))[0] for J in batch])
    np.testing.assert_allclose(batched, looped, rtol=1e-12)

    # float32 in -> float32 out (solved in float64); TorchJD float32 value (torchvenv).
    J32 = J_5X7.astype(jnp.float32)
    w32, state32 = _nash(agg, J32, agg.init(J32))
    assert w32.dtype == jnp.float32
    expected = [0.0649284, 0.38912117, 0.12444174, 0.1630146, 0.13413917]
    np.testing.assert_allclose(w32, expected, rtol=0, atol=1e-4)

    # Non-differentiable: zero gradient.
    grad = jax.grad(lambda J: jnp.sum(agg(J, agg.init(J))[0] ** 2))(J_5X7)
    np.testing.assert_array_equal(grad, jnp.zeros_like(J_5X7))


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
