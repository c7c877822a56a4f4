"""MGDA, CAGrad, AlignedMTL, IMTLG, Krum, TrimmedMean and ConFIG (issue 3): TorchJD
0.18.0 parity, TorchJD's properties (methods.md §8), jit/vmap, dtypes, bad input,
degenerate inputs and gradients.

Reference values come from tests/reference/zoo.npz (TorchJD 0.18.0, float64; see
tests/reference/README.md) and from the published values of methods.md §9.2-9.4.
"""

import collections

import equinox as eqx
import eqxjd
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from eqxjd._aggregation.cagrad import _cagrad_weights
from eqxjd._aggregation.krum import KrumWeighting

from .helpers import (
    DTYPES,
    finite_difference_jvp,
    FLOAT,
    gaussian,
    jacobian_kinds,
    load_reference,
    mode_tol,
    requires_x64,
    x64_enabled,
)


ZOO = load_reference("zoo")
J_BASE = jnp.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
J_KRUM = jnp.array(
    [[1.0, 1, 1], [1, 0, 1], [75, -666, 23], [1, 2, 3], [2, 0, 1]], dtype=FLOAT
)
J_TM = jnp.array([[1e11, 3], [1, -1e11], [-1e10, 1e10], [2, 2]])
SCALES = (0.0, 1e-10, 1e3, 1e5, 1e10, 1e15)


def _gramian(J):
    return jnp.matmul(J, J.T, precision=jax.lax.Precision.HIGHEST)


def _names(method):
    return sorted({k.split("/")[1] for k in ZOO if k.startswith(f"{method}/")})


def _by_rows(names):
    groups = collections.defaultdict(list)
    for name in names:
        groups[ZOO[f"J/{name}"].shape[0]].append(name)
    return groups


def _batched_weights(fn, names, rows):
    """`fn(G)` for every fixture with a number of rows in `rows`, one compilation per
    number of rows (vmap over stacked Gramians)."""
    fn = jax.jit(jax.vmap(fn))
    out = {}
    for m, group in sorted(_by_rows(names).items()):
        if m not in rows:
            continue
        grams = jnp.stack([_gramian(jnp.asarray(ZOO[f"J/{n}"])) for n in group])
        results = jax.tree.map(np.asarray, fn(grams))
        for i, name in enumerate(group):
            out[name] = jax.tree.map(lambda x: x[i], results)
    return out


def _d_err(d, ref, w, J):
    """Error of an aggregation relative to the scale of its terms (sum_i |w_i| |g_i|),
    so that cancellations (d ~ 0 on stationary J) count as rounding noise."""
    scale = float(np.max(np.abs(w) @ np.abs(J), initial=0.0))
    return float(np.max(np.abs(d - ref), initial=0.0)) / max(scale, 1e-300)


def _w_err(w, ref):
    return float(np.max(np.abs(w - ref), initial=0.0)) / max(
        np.max(np.abs(ref)), 1e-300
    )


# Gramian-weighted methods: (fixture id, weighting, tolerance on w and d).
# Ill-conditioned fixtures (low rank + 1e-3 noise, float32-rounded entries) are
# sensitive to rounding in eigh/SVD, so they get a looser bound.
DETERMINISTIC = {
    "mgda": (eqxjd.MGDAWeighting(), 1e-9),
    "mgda_e1e-5": (eqxjd.MGDAWeighting(1e-5, 1000), 1e-9),
    "alignedmtl_min": (eqxjd.AlignedMTLWeighting(), 1e-7),
    "alignedmtl_median": (eqxjd.AlignedMTLWeighting(scale_mode="median"), 1e-7),
    "alignedmtl_rmse": (eqxjd.AlignedMTLWeighting(scale_mode="rmse"), 1e-7),
    "imtlg": (eqxjd.IMTLGWeighting(), 1e-7),
}
ILLCOND_TOL = 1e-5
# Compilation dominates the runtime: the fixtures are checked for these row counts
# (J_base and the pairs, the 4x3 normal/scaled matrices, 5x7 and J_Krum, 9x11,
# and the 32-row ill-conditioned and Gaussian ones).
ROWS = (2, 4, 5, 9, 32)


@requires_x64
def test_reference_gramian_methods():
    names = sorted(set().union(*(_names(mid) for mid in DETERMINISTIC)))
    weights = _batched_weights(
        lambda G: {mid: w(G) for mid, (w, _) in DETERMINISTIC.items()}, names, ROWS
    )
    assert len(weights) > 30
    for mid, (_, tol) in DETERMINISTIC.items():
        for name, ws in weights.items():
            J, w = ZOO[f"J/{name}"], ws[mid]
            bound = ILLCOND_TOL if name.startswith("illcond") else tol
            assert _w_err(w, ZOO[f"{mid}/{name}/w"]) <= bound, (mid, name)
            assert _d_err(w @ J, ZOO[f"{mid}/{name}/d"], w, J) <= bound, (mid, name)


def _krum_tied(J, n_byzantine, n_selected):
    """Whether the selection boundary of Krum has (near-)tied scores on J."""
    G = J @ J.T
    n = np.diag(G)
    D = np.sqrt(np.maximum(n[None] + n[:, None] - 2 * G, 0))
    q = J.shape[0] - n_byzantine - 2
    scores = np.sort(np.sort(D, axis=1)[:, 1 : q + 1].sum(1))
    if n_selected == J.shape[0]:
        return False
    return scores[n_selected] - scores[n_selected - 1] <= 1e-9 * max(scores[-1], 1e-300)


@requires_x64
@pytest.mark.parametrize("mid,n_selected", [("krum_1", 1), ("krum_1_2", 2)])
def test_reference_krum(mid, n_selected):
    weights = _batched_weights(KrumWeighting(1, n_selected), _names(mid), ROWS)
    checked = 0
    for name in weights:
        J = ZOO[f"J/{name}"]
        if _krum_tied(J, 1, n_selected):  # TorchJD's top-k tie order is unspecified
            continue
        checked += 1
        w = weights[name]
        np.testing.assert_array_equal(w, ZOO[f"{mid}/{name}/w"], err_msg=name)
        assert _d_err(w @ J, ZOO[f"{mid}/{name}/d"], w, J) <= 1e-12, name
    assert checked >= 10


def _padded(names, m, n):
    return jnp.stack(
        [
            jnp.pad(
                jnp.asarray(ZOO[f"J/{k}"]),
                [(0, m - ZOO[f"J/{k}"].shape[0]), (0, n - ZOO[f"J/{k}"].shape[1])],
            )
            for k in names
        ]
    )


@requires_x64
def test_reference_trimmed_mean_and_config():
    # Zero columns are exact padding for both; zero rows are exact for ConFIG (their
    # unit vector is 0), so each runs with one or a few compilations.
    small = [
        k
        for k in _names("config")
        if ZOO[f"J/{k}"].shape[0] <= 9 and ZOO[f"J/{k}"].shape[1] <= 11
    ]
    assert len(small) >= 25
    out = jax.jit(jax.vmap(eqxjd.ConFIG()))(_padded(small, 9, 11))
    for name, d in zip(small, np.asarray(out)):
        J = ZOO[f"J/{name}"]
        ref = ZOO[f"config/{name}/d"]
        assert _d_err(d[: J.shape[1]], ref, np.ones(J.shape[0]), J) <= 1e-9, name
        np.testing.assert_array_equal(d[J.shape[1] :], 0)
    tm = jax.jit(jax.vmap(eqxjd.TrimmedMean(1)))
    for m, group in sorted(_by_rows(_names("trimmedmean_1")).items()):
        if m not in ROWS:
            continue
        n = max(ZOO[f"J/{k}"].shape[1] for k in group)
        for name, d in zip(group, np.asarray(tm(_padded(group, m, n)))):
            J = ZOO[f"J/{name}"]
            ref = ZOO[f"trimmedmean_1/{name}/d"]
            assert np.allclose(
                d[: J.shape[1]], ref, rtol=1e-12, atol=1e-14 * np.abs(J).max()
            ), name
    for name in ("base", "5x7"):
        J = jnp.asarray(ZOO[f"J/{name}"])
        agg = eqxjd.ConFIG(ZOO[f"config_pref/{name}/pref"])
        assert np.allclose(agg(J), ZOO[f"config_pref/{name}/d"], rtol=1e-9, atol=1e-12)
        agg = eqxjd.AlignedMTL(ZOO[f"alignedmtl_pref/{name}/pref"])
        assert np.allclose(agg.weights(J), ZOO[f"alignedmtl_pref/{name}/w"], rtol=1e-9)
        assert np.allclose(
            agg(J), ZOO[f"alignedmtl_pref/{name}/d"], rtol=1e-9, atol=1e-12
        )


def _cagrad_objective(G, w, c):
    m = G.shape[0]
    tr = np.trace(G)
    Gn = G / tr if tr >= 1e-4 else 0 * G
    b = Gn @ np.full(m, 1 / m)
    s = c * np.sqrt(max(Gn.sum(), 0)) / m
    return b @ w + s * np.sqrt(max(w @ Gn @ w, 0))


def _cagrad_star(weights):
    """Recovers w* in the simplex from weights = 1/m + (s / ||R^T w*||) w*."""
    m = len(weights)
    return (weights - 1 / m) / (weights.sum() - 1)


# Fixtures with 2, 4 or 5 rows (3 compilations, both c at once). TorchJD's CLARABEL
# answer is accurate to ~1e-8 on J_base, J_5x7 and J_TM for c = 0.5 (we check 1e-7
# there), and only to ~3e-5 on the other fixtures (flat objective, methods.md §4.4;
# 2e-2 in w on J_Krum), so there we check 1e-4 (c = 0.5) / 1e-3 (c = 1) on d, and
# that eqxjd's objective is at least as good as TorchJD's on every fixture.
CAGRAD_EXACT = ("base", "5x7", "tm")


@requires_x64
def test_reference_cagrad():
    cs = jnp.array([0.5, 1.0])
    eps = jnp.asarray(1e-4)
    names = sorted(set(_names("cagrad_c0.5")) & set(_names("cagrad_c1")))
    weights = _batched_weights(
        lambda G: jax.vmap(_cagrad_weights, (None, 0, None))(G, cs, eps),
        names,
        (2, 4, 5),
    )
    assert len(weights) >= 20
    for name, both in weights.items():
        for c, w, mid in zip((0.5, 1.0), both, ("cagrad_c0.5", "cagrad_c1")):
            J = ZOO[f"J/{name}"]
            G = J @ J.T
            ref = ZOO[f"{mid}/{name}/w"]
            d, d_ref = w @ J, ZOO[f"{mid}/{name}/d"]
            if np.all(ref == 0) and np.all(w == 0):
                continue
            if np.all(ref == 0) and c >= 1:
                # Rank-1 J with 0 in the hull and c = 1: the objective is flat (0) on a
                # segment that contains x = 0; TorchJD returned x ~ 0 (zero weights).
                assert abs(_cagrad_objective(G, _cagrad_star(w), c)) <= 1e-12, name
                continue
            f, f_ref = (_cagrad_objective(G, _cagrad_star(x), c) for x in (w, ref))
            assert f <= f_ref + 1e-12, (c, name)
            if c == 0.5 and name in CAGRAD_EXACT:
                tol = 1e-7
            elif c == 0.5:
                tol = 1e-4
            else:
                tol = 1e-3
            assert _d_err(d, d_ref, np.abs(w) + np.abs(ref), J) <= tol, (c, name)


@requires_x64
def test_published_values():
    """methods.md §9.2-9.4 (TorchJD 0.18.0, float64)."""

    def close(x, y, rtol=1e-9):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=1e-10)

    close(eqxjd.MGDA()(J_BASE), [0, 1, 1])
    close(eqxjd.MGDA().weights(J_BASE), [0.6, 0.4])
    close(eqxjd.MGDA()(J_KRUM), [1, 0, 1])
    cagrad = eqxjd.CAGrad(c=0.5)
    close(cagrad(J_BASE), [0.1835034204, 1.204124148, 1.204124148], 1e-8)
    close(cagrad.weights(J_BASE), [0.7041241467, 0.5000000012], 1e-8)
    # c = 1: TorchJD's w = [1.199978642, 0.7999679646] is off by 3e-5; the optimum is:
    close(eqxjd.CAGrad(c=1.0).weights(J_BASE), [1.2, 0.8], 1e-8)
    close(eqxjd.AlignedMTL()(J_BASE), [0.213278746, 0.9673329838, 0.9673329838])
    close(eqxjd.AlignedMTL().weights(J_BASE), [0.5590719157, 0.4082610681])
    close(eqxjd.AlignedMTL(scale_mode="median")(J_BASE), eqxjd.AlignedMTL()(J_BASE))
    close(
        eqxjd.AlignedMTL(scale_mode="rmse")(J_BASE),
        [0.5763758127, 2.614172041, 2.614172041],
    )
    close(
        eqxjd.AlignedMTL(jnp.array([1.0, 2.0]))(J_BASE),
        [2.007851663, 2.751188104, 2.751188104],
    )
    close(eqxjd.AlignedMTL()(J_KRUM), [0.4346761435, -0.2117983915, 0.3445739817], 1e-7)
    close(eqxjd.IMTLG()(J_BASE), [0.07669683062, 1, 1])
    close(eqxjd.IMTLG().weights(J_BASE), [0.5923303169, 0.4076696831])
    close(
        eqxjd.IMTLG().weights(J_KRUM),
        [-0.04601977318, 0.03316070687, 0.009982713198, 1.998310132, -0.9954337788],
    )
    close(eqxjd.Krum(1, 4)(J_KRUM), [1.25, 0.75, 1.5])
    close(eqxjd.Krum(1, 4).weights(J_KRUM), [0.25, 0.25, 0, 0.25, 0.25])
    close(eqxjd.Krum(1)(J_KRUM), [1, 0, 1])
    # (methods.md also lists Krum(2) -> [1, 0, 1]: rows 0, 1 and 4 tie there and
    # TorchJD's top-k picked row 1; eqxjd picks the lowest index, row 0.)
    close(eqxjd.TrimmedMean(1)(J_TM), [1.5, 2.5])
    close(eqxjd.TrimmedMean(1)(J_KRUM), [1.333333333, 0.3333333333, 1.666666667])
    close(eqxjd.ConFIG()(J_BASE), [0.1588089758, 2.070606758, 2.070606758])
    close(
        eqxjd.ConFIG(jnp.array([1.0, 2.0]))(J_BASE),
        [0.4684087453, 2.165635178, 2.165635178],
    )
    close(eqxjd.ConFIG()(J_KRUM), [57.62857027, -125.6058654, 277.1772522], 1e-8)


def test_special_cases():
    anti = jnp.array([[1.0, 0.0], [-1.0, 0.0]])
    dup = jnp.array([[1.0, 0.0], [1.0, 0.0]])
    row = jnp.array([[1.0, 2.0, 3.0]])
    close = np.testing.assert_allclose
    close(eqxjd.MGDA().weights(anti), [0.5, 0.5])
    close(eqxjd.MGDA().weights(jnp.zeros((3, 2))), [1, 0, 0])  # e_0
    close(eqxjd.MGDA().weights(jnp.array([[1.0, 2], [0, 0], [3, 1]])), [0, 1, 0])
    if x64_enabled():
        close(eqxjd.CAGrad(0.5).weights(dup), [0.75, 0.75], rtol=1e-8)
    else:  # float32 solves pick other weights for the same (unique) update
        close(eqxjd.CAGrad(0.5)(dup), [1.5, 0], rtol=1e-6)
    close(eqxjd.CAGrad(0.5)(row), 1.5 * row[0])
    close(eqxjd.CAGrad(0.0).weights(J_BASE), [0.5, 0.5])  # c = 0: the mean
    close(eqxjd.CAGrad(0.5).weights(J_BASE * 1e-3), [0, 0])  # tiny Jacobian: zero
    close(eqxjd.ConFIG()(dup), [2, 0])
    close(eqxjd.ConFIG()(anti), [0, 0], atol=1e-15)
    close(eqxjd.IMTLG().weights(jnp.array([[1.0, 2], [0, 0]])), [1, 0])
    for agg in (eqxjd.MGDA(), eqxjd.AlignedMTL(), eqxjd.IMTLG(), eqxjd.ConFIG()):
        close(agg(row), row[0], rtol=1e-12)


def test_imtlg_float32_antiparallel():
    # TorchJD 0.18.0 returns w ~ [-1, 2], d = [-3, 0] here in float32 (an absolute
    # 1e-12 threshold on a sum that is pure rounding noise); eqxjd returns 0 as float64.
    J = jnp.array([[1.0, 0.0], [-1.0, 0.0]], dtype=jnp.float32)
    w = eqxjd.IMTLG().weights(J)
    assert w.dtype == jnp.float32
    np.testing.assert_array_equal(w, [0, 0])
    if x64_enabled():
        np.testing.assert_array_equal(eqxjd.IMTLG()(J.astype(jnp.float64)), [0, 0])


AGGREGATORS = [
    eqxjd.MGDA(),
    eqxjd.CAGrad(0.5),
    eqxjd.AlignedMTL(),
    eqxjd.IMTLG(),
    eqxjd.Krum(1),
    eqxjd.TrimmedMean(1),
    eqxjd.ConFIG(),
]
IDS = ["mgda", "cagrad", "alignedmtl", "imtlg", "krum", "trimmedmean", "config"]


@pytest.mark.parametrize("agg", AGGREGATORS, ids=IDS)
def test_structure_jit_vmap_dtypes(agg, getkey):
    """Scaled matrices 0..1e15 (methods.md §8), float32 and float64: finite output of
    shape (n,) and the input dtype; jit == eager; vmap == loop; no retrace."""
    base = gaussian(getkey(), 4, 3)
    batch = jnp.stack([base * s for s in SCALES] + [gaussian(getkey(), 4, 3)])
    traced = eqx.debug.assert_max_traces(agg, max_traces=2)  # one per dtype
    jitted = eqx.filter_jit(agg)
    vmapped = eqx.filter_jit(eqx.filter_vmap(traced))
    for dtype in DTYPES:
        x = batch.astype(dtype)
        out = vmapped(x)
        assert out.shape == (len(SCALES) + 1, 3) and out.dtype == dtype
        assert bool(jnp.all(jnp.isfinite(out)))
        if dtype == jnp.float64:
            loop = jnp.stack([jitted(j) for j in x])
            atol = 1e-9 * jnp.abs(loop).max()
            np.testing.assert_allclose(out, loop, rtol=1e-9, atol=atol)
    zero = jitted(jnp.zeros((4, 3)))
    np.testing.assert_array_equal(zero, jnp.zeros(3))
    np.testing.assert_allclose(
        jitted(base), agg(base), rtol=mode_tol(1e-12, 1e-5), atol=mode_tol(1e-15, 1e-6)
    )


def _perm_check(agg, J, key, atol):
    expected = agg(J)
    for k in jr.split(key, 3):
        perm = jr.permutation(k, J.shape[0])
        np.testing.assert_allclose(agg(J[perm]), expected, rtol=atol, atol=atol)


@pytest.mark.parametrize(
    "agg,non_conflicting,permutation_invariant",
    [
        (eqxjd.MGDA(1e-5, 1000), True, True),
        (eqxjd.AlignedMTL(), False, True),
        (eqxjd.IMTLG(), False, True),
        (eqxjd.TrimmedMean(1), False, True),
        (eqxjd.ConFIG(), False, True),
    ],
    ids=["mgda", "alignedmtl", "imtlg", "trimmedmean", "config"],
)
def test_properties(agg, non_conflicting, permutation_invariant, getkey):
    """methods.md §8: non-conflicting (J d >= 0) and permutation invariance."""
    agg = eqx.filter_jit(agg)
    kinds = jacobian_kinds(getkey())
    # Frank-Wolfe converges too slowly on the ill-conditioned low-rank kinds for an
    # approximate min-norm point to be non-conflicting to 4e-4 (zero: structure test).
    for name in ("gaussian", "wide", "tall", "conflicting"):
        J = kinds[name]
        if permutation_invariant and J.shape[0] < 3:  # TrimmedMean(1) needs 3 rows
            continue
        d = agg(J)
        assert bool(jnp.all(jnp.isfinite(d))), name
        if non_conflicting:  # TorchJD's check: ||y_+|| ~ ||y|| (atol = rtol = 4e-4)
            y = J @ d
            norm, positive = jnp.linalg.norm(y), jnp.linalg.norm(jnp.maximum(y, 0))
            assert float(norm - positive) <= 4e-4 + 4e-4 * float(norm), name
        if permutation_invariant:
            _perm_check(agg, J, getkey(), mode_tol(1e-6, 1e-3))


def test_mgda_kkt(getkey):
    """methods.md §4.3: w in the simplex, G w - (w^T G w) 1 >= 0."""
    weighting = jax.jit(eqxjd.MGDAWeighting(epsilon=1e-5, max_iters=1000))
    for m, n in [(5, 7), (9, 12), (2, 14)]:
        J = gaussian(getkey(), m, n)
        G = _gramian(J)
        w = weighting(G)
        assert bool(jnp.all(w >= 0)) and abs(float(jnp.sum(w)) - 1) < mode_tol(
            1e-12, 1e-5
        )
        mu = G @ w - (w @ G @ w)
        assert float(jnp.min(mu)) >= -1e-2


_CAGRAD_CS = jnp.array([0.5, 1.0, 2.0])
_cagrad_all_c = jax.jit(
    lambda G: jax.vmap(_cagrad_weights, (None, 0, None))(
        G, _CAGRAD_CS, jnp.asarray(1e-4)
    )
)


def test_cagrad_optimality_and_non_conflict(getkey):
    """The solution satisfies the KKT conditions of min_{w in simplex} b^T w +
    s ||R^T w||, and is non-conflicting for c >= 1 (methods.md §8)."""
    kinds = jacobian_kinds(getkey())
    for name in ("gaussian", "tall", "conflicting", "stationary"):
        J = np.asarray(kinds[name])
        m = J.shape[0]
        G = J @ J.T
        Gn = G / np.trace(G)
        b = Gn @ np.full(m, 1 / m)
        for c, weights in zip(np.asarray(_CAGRAD_CS), np.asarray(_cagrad_all_c(G))):
            if c >= 1:
                y = J @ (weights @ J)
                norm, positive = np.linalg.norm(y), np.linalg.norm(np.maximum(y, 0))
                assert norm - positive <= 4e-4 + 4e-4 * norm, (c, name)
            if not np.any(weights):
                continue  # zero weights: ||R^T w*|| < norm_eps
            w = _cagrad_star(weights)
            assert np.all(w >= -1e-12) and abs(w.sum() - 1) < mode_tol(1e-10, 1e-5)
            s = c * np.sqrt(Gn.sum()) / m
            rho = np.sqrt(w @ Gn @ w)
            grad = b + s * Gn @ w / rho
            lam = grad @ w
            # The 1e-10 ridge that makes w unique perturbs the gradient by ~s 1e-10/rho.
            tol = mode_tol(1e-9) * (1 + s / rho)
            assert np.all(grad - lam >= -tol), (c, name)  # stationarity
            assert np.all(np.abs((grad - lam) * w) <= tol), (c, name)  # complementarity


def test_config_linear_under_scaling(getkey):
    agg = eqxjd.ConFIG()
    J = gaussian(getkey(), 5, 7)
    for _ in range(3):
        c1, c2 = jr.uniform(getkey(), (5,)), jr.uniform(getkey(), (5,))
        a, b = 0.3, 0.6
        lhs = agg((a * c1 + b * c2)[:, None] * J)
        rhs = a * agg(c1[:, None] * J) + b * agg(c2[:, None] * J)
        np.testing.assert_allclose(
            lhs, rhs, rtol=mode_tol(1e-9), atol=mode_tol(1e-12, 1e-5)
        )


def test_bad_input():
    errors = (TypeError, ValueError)
    with pytest.raises(errors):
        eqxjd.MGDA(epsilon=0.0)
    with pytest.raises(errors):
        eqxjd.MGDA(max_iters=0)
    with pytest.raises(errors):
        eqxjd.CAGrad(c=-0.1)
    with pytest.raises(errors):
        eqxjd.CAGradWeighting(c=1.0, norm_eps=-1.0)
    with pytest.raises(errors):
        eqxjd.AlignedMTL(scale_mode="max")  # pyright: ignore[reportArgumentType]
    with pytest.raises(errors):
        eqxjd.AlignedMTLWeighting(scale_mode="mean")  # pyright: ignore[reportArgumentType]
    with pytest.raises(errors):
        eqxjd.Krum(n_byzantine=-1)
    with pytest.raises(errors):
        eqxjd.Krum(n_byzantine=1, n_selected=0)
    with pytest.raises(errors):
        eqxjd.TrimmedMean(-1)
    with pytest.raises(errors):
        eqxjd.AlignedMTL(jnp.ones((2, 2)))
    # Row counts (TorchJD's tests: Krum (1, 1, m=3) raises, (1, 1, 4) and (1, 4, 4) ok,
    # (12, 4, 14) raises, (12, 4, 15) ok; TrimmedMean needs 2 t + 1 rows).
    with pytest.raises(errors):
        eqxjd.Krum(1)(jnp.ones((3, 2)))
    eqxjd.Krum(1)(jnp.ones((4, 2)))
    eqxjd.Krum(1, 4)(jnp.ones((4, 2)))
    with pytest.raises(errors):
        eqxjd.Krum(12, 4)(jnp.ones((14, 2)))
    eqxjd.Krum(12, 4)(jnp.ones((15, 2)))
    with pytest.raises(errors):
        eqxjd.Krum(1, 6)(jnp.ones((5, 2)))
    with pytest.raises(errors):
        eqxjd.TrimmedMean(2)(jnp.ones((4, 3)))
    eqxjd.TrimmedMean(2)(jnp.ones((5, 3)))
    with pytest.raises(errors):
        eqxjd.ConFIG(jnp.ones(3))(J_BASE)
    with pytest.raises(errors):
        eqxjd.AlignedMTL(jnp.ones(3))(J_BASE)
    for agg in AGGREGATORS:
        with pytest.raises(errors):
            agg(jnp.ones((2, 3, 4)))
        with pytest.raises(errors):
            agg(jnp.ones(3))


def test_krum_ties_and_negative_distances():
    # Exact ties go to the lowest index (TorchJD's order is unspecified).
    np.testing.assert_array_equal(
        eqxjd.Krum(1).weights(jnp.zeros((4, 3))), [1, 0, 0, 0]
    )
    # Duplicate rows: rounding makes some D^2 slightly negative; no NaN (0.18 clamp).
    J = jnp.tile(jnp.array([[0.1, 0.7, 1.3]]), (5, 1))
    w = eqxjd.Krum(1, 2).weights(J)
    np.testing.assert_array_equal(w, [0.5, 0.5, 0, 0, 0])
    assert bool(jnp.all(jnp.isfinite(jax.grad(lambda x: eqxjd.Krum(1)(x).sum())(J))))


@pytest.mark.parametrize(
    "agg",
    [
        eqxjd.MGDA(),
        eqxjd.AlignedMTL(),
        eqxjd.AlignedMTL(scale_mode="rmse"),
        eqxjd.Krum(1),
        eqxjd.TrimmedMean(1),
    ],
    ids=["mgda", "alignedmtl", "alignedmtl_rmse", "krum", "trimmedmean"],
)
@requires_x64
def test_gradients_differentiable(agg, getkey):
    """Forward and reverse mode agree with central finite differences (float64)."""
    for J in (
        gaussian(getkey(), 4, 6),
        gaussian(getkey(), 6, 3),
    ):  # full rank, rank-deficient
        tangent = jr.normal(getkey(), J.shape)
        _, jvp = eqx.filter_jvp(agg, (J,), (tangent,))
        fd = finite_difference_jvp(agg, (J,), (tangent,), eps=1e-6)
        np.testing.assert_allclose(jvp, fd, rtol=1e-5, atol=1e-6)
        cot = jr.normal(getkey(), (J.shape[1],))
        grad = jax.grad(lambda x: agg(x) @ cot)(J)
        np.testing.assert_allclose(
            jnp.sum(grad * tangent), jvp @ cot, rtol=1e-8, atol=1e-10
        )


@pytest.mark.parametrize(
    "agg",
    [eqxjd.CAGrad(0.5), eqxjd.IMTLG(), eqxjd.ConFIG()],
    ids=["cagrad", "imtlg", "config"],
)
def test_gradients_non_differentiable(agg):
    """TorchJD's non-differentiable set: gradients are zero, never wrong or NaN."""
    grad = jax.grad(lambda x: jnp.sum(agg(x)))(J_BASE)
    np.testing.assert_array_equal(grad, jnp.zeros_like(J_BASE))
    _, tangent_out = eqx.filter_jvp(agg, (J_BASE,), (jnp.ones_like(J_BASE),))
    assert tangent_out is None or not bool(jnp.any(tangent_out))  # symbolic or zero
