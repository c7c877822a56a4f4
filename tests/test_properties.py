"""Property-based tests of the dual-cone projector, UPGrad and DualProj (hypothesis).

Jacobians come in a few kinds (Gaussian; ill-conditioned: low rank plus 1e-3 noise;
nearly collinear rows with random signs; rows scaled by 10^U(-3, 3)) and a small fixed
set of shapes up to m = 64, half of them with m > n; only the values vary, so each m
compiles once. Every property runs in float64 and in float32 (solved in float32).
Exactness is checked against `reference_qp`, a small exact NumPy solver, so the tests
need neither quadprog nor scipy.
"""

import os
import typing

import equinox as eqx
import eqxjd
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, HealthCheck, Phase, settings


# (m, n); half of them with m > n. One compilation per m: the solver sees G (m x m).
SHAPES = ((3, 8), (3, 2), (12, 5), (12, 30), (24, 40), (24, 10))
LARGE = (64, 16)
KINDS = ("gaussian", "ill_conditioned", "correlated", "row_scaled")
DTYPES = ("float64", "float32")
SOLVERS = ("bpp", "nesterov_pgd", "qpax")
# Acceptance bound of the projector's relative KKT residual (see `DualConeSolution`).
KKT_TOL = {"float64": 1e-9, "float32": 1e-4}


def kkt_tol(dtype, reg_eps, gramian):
    """The projector's acceptance bound. With reg_eps = 0 the Gramian may be singular:
    float32 resolves its null space to about sqrt(eps) only, and the projector accepts
    sqrt(eps) times the Frobenius norm of the canonical Gramian there."""
    if reg_eps or dtype == "float64":
        return KKT_TOL[dtype]
    g_hat = canonical(normalised_gramian(gramian, 0.0, 0.0), np.eye(len(gramian)))[0]
    rounding = np.sqrt(np.finfo(np.float32).eps) * np.linalg.norm(g_hat)
    return max(KKT_TOL[dtype], rounding)


# `EQXJD_PROPERTY_SCALE` scales every example count (e.g. 0.1 for a quick run).
_SCALE = float(os.environ.get("EQXJD_PROPERTY_SCALE", "1"))


def _settings(examples):
    return settings(
        max_examples=max(1, int(examples * _SCALE)),
        deadline=None,
        derandomize=True,
        database=None,
        phases=(Phase.explicit, Phase.generate, Phase.shrink),
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# --- an exact reference ---------------------------------------------------------------


def reference_qp(g, u):
    r"""$\operatorname{argmin}_{v \geq u} \frac12 v^\top g v$ for a PSD `g`, exactly.

    Lawson & Hanson's active-set method for non-negative least squares: with
    $s = v - u$ and $a^\top a = g$ it solves $\min_{s \geq 0} \|a (u + s)\|$, moving
    one index at a time into the passive set $P$ and solving the least-squares
    problem on the columns $a_P$ exactly. They stay linearly independent, so a singular
    `g` (a rank-deficient Jacobian) is solved too; $v$ is then one of the solutions,
    and $g v$ (hence $J^\top v$) is the unique one.
    """
    g, u = np.asarray(g, np.float64), np.asarray(u, np.float64)
    m = u.shape[0]
    # Solves on columns of a are conditioned as a, not as g = a^T a.
    values, vectors = np.linalg.eigh(g)
    a = (vectors * np.sqrt(np.clip(values, 0.0, None))).T
    b = -(a @ u)
    q = g @ u
    scale = max(np.max(np.abs(g)), 1e-300) * max(np.max(np.abs(u)), 1e-300)
    tol = 1e-13 * scale
    passive = np.zeros(m, bool)
    s = np.zeros(m)

    def solve(passive):
        z = np.zeros(m)
        index = np.flatnonzero(passive)
        if index.size:
            z[index] = np.linalg.lstsq(a[:, index], b, rcond=None)[0]
        return z

    for _ in range(10 * m + 10):
        gradient = q + g @ s
        candidates = ~passive & (gradient < -tol)
        if not np.any(candidates):
            break
        passive[np.argmin(np.where(candidates, gradient, np.inf))] = True
        for _ in range(m + 1):
            z = solve(passive)
            blocking = passive & (z <= 0)
            if not np.any(blocking):
                s = z
                break
            alpha = np.min(s[blocking] / (s[blocking] - z[blocking]))
            s = s + alpha * (z - s)
            passive &= s > 1e-14  # rounding-level entries leave P
            s = np.where(passive, s, 0.0)
    else:
        raise AssertionError("reference_qp did not converge")
    return u + s


def natural_residual(g, u, v):
    r"""$\|\min(v - u, g v)\|_\infty / \max(1, \|v\|_\infty)$ (zero at the solution)."""
    natural = np.minimum(v - u, v @ g)
    return np.max(np.abs(natural), axis=-1) / np.maximum(1.0, np.max(np.abs(v), -1))


def normalised_gramian(g, norm_eps, reg_eps):
    """TorchJD's G' = G / tr(G) + reg_eps I, with G / tr(G) = 0 when
    tr(G) < norm_eps."""
    trace = np.trace(g)
    small = trace < norm_eps or trace <= 0
    return (0.0 * g if small else g / trace) + reg_eps * np.eye(g.shape[0])


def canonical(g, lower):
    r"""The canonical problem of the projector's driver, in NumPy: unit diagonal
    (Jacobi scaling, $\hat G = D G D$) and lanes with $\max |\hat u| = 1$. Returns
    $\hat G$, $\hat u$ and $v \mapsto \hat v$."""
    diag = np.diagonal(g)
    d = np.where(diag > 0, 1 / np.sqrt(np.where(diag > 0, diag, 1.0)), 1.0)
    g_hat = g * d[:, None] * d[None, :]
    g_hat[np.diag_indices_from(g_hat)] = np.where(diag > 0, np.diagonal(g_hat), 1.0)
    u = lower / d
    scale = np.max(np.abs(u), axis=-1, keepdims=True)
    scale = np.where(scale > 0, scale, 1.0)
    return g_hat, u / scale, lambda v: v / d / scale


# --- Jacobians ------------------------------------------------------------------------


def jacobian(kind, m, n, seed, scale=1.0):
    rng = np.random.default_rng(seed)
    if kind == "gaussian":
        out = rng.standard_normal((m, n))
    elif kind == "ill_conditioned":
        rank = int(rng.integers(1, max(2, min(m, n) // 2) + 1))
        out = rng.standard_normal((m, rank)) @ rng.standard_normal((rank, n))
        out = out + 1e-3 * rng.standard_normal((m, n))
    elif kind == "correlated":
        direction = rng.standard_normal(n)
        signs = np.where(rng.random(m) < 0.5, -1.0, 1.0)
        noise = rng.uniform(0.01, 0.5)
        out = signs[:, None] * (direction + noise * rng.standard_normal((m, n)))
    elif kind == "row_scaled":
        out = rng.standard_normal((m, n)) * 10 ** rng.uniform(-3, 3, (m, 1))
    else:
        raise ValueError(kind)
    return scale * out


def _problems(large_one_in):
    """(kind, (m, n), dtype, seed), with m = 64 for about one example in
    `large_one_in`. (It sits mid-list: hypothesis draws the ends of a range more
    often, and shrinks towards the start.)"""
    small = list(SHAPES) * (large_one_in // len(SHAPES))
    middle = len(small) // 2
    shapes = st.sampled_from(small[:middle] + [LARGE] + small[middle:])
    return st.tuples(
        st.sampled_from(KINDS),
        shapes,
        st.sampled_from(DTYPES),
        st.integers(0, 2**32 - 1),
    )


problems = _problems(20)
# Without the ridge, m = 64 Gramians of rank 16 are singular (a slower solve).
strict_problems = _problems(60)


# --- the API under test ---------------------------------------------------------------
#
# One solve per example gives everything: the lanes are e_1..e_m (UPGrad's QPs: its
# weights are p @ V), then p (DualProj's QP: its weights), then general bounds of mixed
# sign. One compilation per solver, shape and dtype; `test_classes_match_the_projector`
# ties the UPGrad and DualProj classes to this construction.


def _lanes(m, seed):
    """UPGrad's lanes e_i, DualProj's lane p = 1/m, and m - 1 general bounds (positive
    multiples of e_i and vectors of mixed sign, the last one non-positive)."""
    rng = np.random.default_rng(seed + 3)
    general = np.diag(rng.uniform(0.1, 2.0, m))[: m - 1]
    mixed = rng.random(m - 1) < 0.5
    general[mixed] = rng.standard_normal((int(np.sum(mixed)), m))
    general[-1] = -np.abs(rng.standard_normal(m))
    return np.concatenate([np.eye(m), np.full((1, m), 1 / m), general])


@eqx.filter_jit
def _solve(solver, gramian, lower, norm_eps, reg_eps):
    projector = eqxjd.DualConeProjector(
        solver=solver, norm_eps=norm_eps, reg_eps=reg_eps, throw=False
    )
    solution = projector.solve(gramian, lower)
    ok = solution.result == eqxjd.RESULTS.successful
    return solution.value, ok, solution.residual


class Outcome(typing.NamedTuple):
    upgrad: np.ndarray  # weights
    dualproj: np.ndarray  # weights
    value: np.ndarray  # every lane
    ok: bool
    residual: np.ndarray


def run(matrix, dtype, *, solver="bpp", norm_eps=1e-4, reg_eps=1e-4, seed=0):
    """Solves the lanes of `_lanes` for the Jacobian `matrix` (float64 results)."""
    m = matrix.shape[0]
    gramian = matrix @ matrix.T
    lower = _lanes(m, seed)
    with jax.enable_x64(dtype == "float64"):
        eps = [jnp.asarray(x, dtype) for x in (norm_eps, reg_eps)]
        v, ok, residual = _solve(
            solver,
            jnp.asarray(gramian, dtype),
            jnp.asarray(lower, dtype),
            *eps,
        )
        v = np.asarray(v, np.float64)
    return Outcome(
        np.full(m, 1 / m) @ v[:m], v[m], v, bool(ok), np.asarray(residual, np.float64)
    )


# --- non-conflict ---------------------------------------------------------------------


def _multiplier_slack(j, w, norm_eps, reg_eps, dtype):
    r"""The bound $(J d)_i \geq -\epsilon_{reg} \operatorname{tr}(G) w_i$ for
    $d = J^\top w$, as scaled multipliers that must be non-negative up to the
    solver's tolerance.

    The multiplier of each lane is $G' V_j \geq 0$, checked on the Jacobi-scaled
    problem to a relative KKT residual $\rho$, so $(G' w)_i / \sqrt{G'_{ii}} \geq
    -\rho \max(1, \|\hat w\|_\infty)$ with $\hat w_i = w_i \sqrt{G'_{ii}}$: the bound,
    since $G' w = J d / \operatorname{tr} G + \epsilon_{reg} w$. In the normalisation
    cliff ($\operatorname{tr} G < \epsilon_{norm}$) only $(J d)_i \geq
    -\operatorname{tr}(G) \|w\|_2$ holds.
    """
    g = j @ j.T
    trace = np.trace(g)
    y = g @ w
    tol = 10 * kkt_tol(dtype, reg_eps, g)
    if trace < norm_eps:
        bound = max(trace * np.linalg.norm(w), 1e-300)
        return (y + trace * np.linalg.norm(w)) / bound + tol
    g_norm = normalised_gramian(g, norm_eps, reg_eps)
    root = np.sqrt(np.where(np.diagonal(g_norm) > 0, np.diagonal(g_norm), 1.0))
    scaled = (y / trace + reg_eps * w) / root
    return scaled / max(1.0, float(np.max(np.abs(w * root)))) + tol


@_settings(1100)
@given(problems, st.sampled_from(("upgrad", "dualproj")), st.sampled_from((1.0, 1e-3)))
def test_non_conflicting_within_the_documented_bound(problem, method, scale):
    kind, (m, n), dtype, seed = problem
    j = jacobian(kind, m, n, seed, scale).astype(dtype).astype(np.float64)
    out = run(j, dtype)
    assert out.ok, (kind, m, n, dtype)
    slack = _multiplier_slack(j, getattr(out, method), 1e-4, 1e-4, dtype)
    assert np.all(slack >= 0), (kind, m, n, dtype, float(np.min(slack)))


@_settings(1000)
@given(
    strict_problems,
    st.sampled_from(("upgrad", "dualproj")),
    st.sampled_from((1.0, 1e-3)),
)
def test_non_conflicting_strictly_without_regularisation(problem, method, scale):
    kind, (m, n), dtype, seed = problem
    j = jacobian(kind, m, n, seed, scale).astype(dtype).astype(np.float64)
    out = run(j, dtype, norm_eps=0.0, reg_eps=0.0)
    assert out.ok, (kind, m, n, dtype)
    slack = _multiplier_slack(j, getattr(out, method), 0.0, 0.0, dtype)
    assert np.all(slack >= 0), (kind, m, n, dtype, float(np.min(slack)))


# --- invariances ----------------------------------------------------------------------


def _scale_of(w, j):
    """The natural size of d = w^T J: sum_i |w_i| ||g_i||."""
    return max(float(np.sum(np.abs(w) * np.linalg.norm(j, axis=1))), 1e-300)


TOL = {"float64": 1e-9, "float32": 2e-3}


@_settings(2000)
@given(strict_problems, st.booleans())
def test_permutation_invariant(problem, strict):
    kind, (m, n), dtype, seed = problem
    j = jacobian(kind, m, n, seed).astype(dtype).astype(np.float64)
    eps = 0.0 if strict else 1e-4
    perm = np.random.default_rng(seed + 1).permutation(m)
    out = run(j, dtype, norm_eps=eps, reg_eps=eps)
    permuted = run(j[perm], dtype, norm_eps=eps, reg_eps=eps)
    assert out.ok and permuted.ok
    for method in ("upgrad", "dualproj"):
        w, w_perm = getattr(out, method), getattr(permuted, method)
        error = np.max(np.abs((w_perm @ j[perm]) - (w @ j)))
        assert error <= TOL[dtype] * _scale_of(w, j), (kind, m, n, dtype, method)
        if not strict:
            # Unique weights (with reg_eps = 0 they are not when rows are dependent).
            scale = max(1.0, np.max(np.abs(w)))
            assert np.max(np.abs(w_perm - w[perm])) <= TOL[dtype] * scale


@_settings(2000)
@given(_problems(240))
def test_upgrad_linear_under_scaling(problem):
    # Positive row scaling leaves the dual cone unchanged, so without normalisation
    # cliff and ridge c -> A(diag(c) J) is linear on c >= 0.
    kind, (m, n), dtype, seed = problem
    j = jacobian(kind, m, n, seed)
    rng = np.random.default_rng(seed + 2)
    c1, c2 = rng.random((2, m))
    a, b = rng.random(2)
    rows = [(c[:, None] * j).astype(dtype).astype(np.float64) for c in (c1, c2)]
    combined = ((a * c1 + b * c2)[:, None] * j).astype(dtype).astype(np.float64)
    w1, w2, w = (
        run(x, dtype, norm_eps=0.0, reg_eps=0.0).upgrad for x in (*rows, combined)
    )
    d1, d2, d = w1 @ rows[0], w2 @ rows[1], w @ combined
    scale = a * _scale_of(w1, rows[0]) + b * _scale_of(w2, rows[1])
    error = np.max(np.abs(d - (a * d1 + b * d2)))
    assert error <= 2 * TOL[dtype] * max(scale, 1e-300), (kind, m, n, dtype, error)


# --- exactness and the KKT residual ---------------------------------------------------


def _condition(g):
    eigenvalues = np.linalg.eigvalsh(canonical(g, np.eye(g.shape[0]))[0])
    return eigenvalues[-1] / max(eigenvalues[0], 1e-300)


# Accelerated PGD and qpax run up to m = 12 (each compiles and runs slowly).
_SLOW_SHAPES = tuple(shape for shape in SHAPES if shape[0] <= 12)


@_settings(2000)
@given(problems, st.sampled_from(SOLVERS), st.sampled_from((1e-4, 0.0)))
def test_exact_against_the_reference(problem, solver, reg_eps):
    kind, (m, n), dtype, seed = problem
    if solver != "bpp" and (m, n) not in _SLOW_SHAPES:
        m, n = _SLOW_SHAPES[seed % len(_SLOW_SHAPES)]
    j = jacobian(kind, m, n, seed)
    out = run(j, dtype, solver=solver, reg_eps=reg_eps, seed=seed)
    if solver == "nesterov_pgd" and reg_eps == 0.0 and not out.ok:
        # Its proximal subproblems on (nearly) singular Gramians can run out of steps:
        # a documented limitation, reported as a failed result (never a wrong answer).
        return
    assert out.ok, (kind, m, n, dtype, solver, reg_eps)
    # The reference solves the exact problem (float64); the float32 solve sees it
    # rounded, which the bounds allow for.
    # Both are compared on the canonical (Jacobi-scaled) problem, which the projector
    # solves: with rows scaled by 10^±3 the unscaled one is needlessly ill-conditioned.
    lower = _lanes(m, seed)
    normalised = normalised_gramian(j @ j.T, 1e-4, reg_eps)
    g, lanes, to_canonical = canonical(normalised, lower)
    values = to_canonical(out.value)
    condition = _condition(g)
    rng = np.random.default_rng(seed + 4)
    for lane in rng.choice(len(lower), 6, replace=False):
        u = lanes[lane]
        expected = reference_qp(g, u)
        assert natural_residual(g, u, expected) <= 1e-12
        if condition > 1e8 and dtype == "float32":
            # Singular in float32: rows on the solution's face with singular values
            # below sqrt(eps) of the largest are lost in G = J J^T, so J^T v is only
            # as good as its KKT residual (checked by the other properties).
            continue
        if condition > 1e8:
            # v is not unique; J^T v is: compare in the seminorm of G'.
            e = values[lane] - expected
            error = np.sqrt(max(e @ g @ e, 0.0) / max(u @ g @ u, 1e-300))
            bound = 1e-6
        else:
            # Lanes with u <= 0 have the solution 0 (the reference: rounding noise).
            size = max(np.max(np.abs(expected)), np.max(np.abs(u)), 1e-300)
            error = np.max(np.abs(values[lane] - expected)) / size
            bound = max(1e-11, 20 * m * np.finfo(dtype).eps * condition)
        assert error <= bound, (kind, m, n, dtype, solver, reg_eps, lane, error)


@_settings(600)
@given(problems, st.sampled_from((1e-4, 0.0)))
def test_kkt_residual_of_the_solution(problem, reg_eps):
    kind, (m, n), dtype, seed = problem
    j = jacobian(kind, m, n, seed)
    gramian = (j @ j.T).astype(dtype).astype(np.float64)
    out = run(j, dtype, reg_eps=reg_eps, seed=seed)
    tol = kkt_tol(dtype, reg_eps, gramian)
    assert out.ok and np.all(out.residual <= tol), (kind, m, n, dtype)
    # The same residual, recomputed here on the canonical problem.
    lower = _lanes(m, seed)
    g = normalised_gramian(gramian, 1e-4, reg_eps)
    g_hat, u_hat, to_hat = canonical(g, lower)
    trivial = np.max(lower, axis=-1) <= 0
    recomputed = natural_residual(g_hat, u_hat, to_hat(out.value))
    recomputed = np.where(trivial, 0.0, recomputed)
    assert np.all(recomputed <= 2 * tol), (kind, m, n, dtype)
    assert np.all(out.value[trivial] == 0)


@pytest.mark.parametrize("method", ("upgrad", "dualproj"))
def test_classes_match_the_projector(method):
    # UPGrad's weights are p @ projector(G, I) and DualProj's projector(G, p).
    cls = {"upgrad": eqxjd.UPGrad, "dualproj": eqxjd.DualProj}[method]
    for seed, kind in enumerate(KINDS):
        j = jacobian(kind, 12, 5, seed)
        weights = cls().weights(jnp.asarray(j))
        np.testing.assert_allclose(weights, getattr(run(j, "float64"), method))


@pytest.mark.parametrize("m", (3, 8, 20))
def test_reference_qp_is_exact(m):
    # The reference itself satisfies the KKT conditions, on regular and singular
    # Gramians.
    rng = np.random.default_rng(m)
    for rank in (m, max(1, m // 3)):
        a = rng.standard_normal((m, rank))
        g = a @ a.T
        for u in (np.eye(m)[0], rng.standard_normal(m)):
            v = reference_qp(g, u)
            assert natural_residual(g, u, v) <= 1e-12
            assert np.all(v >= u - 1e-12)


# --- MGDA -----------------------------------------------------------------------------


@eqx.filter_jit
def _mgda_weights(jacobian):
    return eqxjd.MGDA().weights(jacobian)


@_settings(200)
@given(problems)
def test_mgda_simplex_and_permutation_invariant(problem):
    # TorchJD's Frank-Wolfe loop: weights on the simplex, and the same iterates (up to
    # rounding) on permuted rows, since its steps only use the Gramian.
    kind, (m, n), dtype, seed = problem
    j = jacobian(kind, m, n, seed).astype(dtype).astype(np.float64)
    perm = np.random.default_rng(seed + 1).permutation(m)
    with jax.enable_x64(dtype == "float64"):
        w = np.asarray(_mgda_weights(jnp.asarray(j, dtype)), np.float64)
        w_perm = np.asarray(_mgda_weights(jnp.asarray(j[perm], dtype)), np.float64)
    assert np.all(w >= -TOL[dtype]) and abs(np.sum(w) - 1) <= TOL[dtype]
    error = np.max(np.abs(w_perm @ j[perm] - w @ j))
    assert error <= 10 * TOL[dtype] * _scale_of(w, j), (kind, m, n, dtype, error)
