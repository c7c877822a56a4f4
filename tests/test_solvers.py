"""The batched dual-cone QP solvers: exactness (KKT and quadprog), convergence
reporting, jit / vmap, invariances, general lower bounds."""

import equinox as eqx
import eqxjd
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from eqxjd._projector import SolverName, to_solver
from eqxjd._solver.bpp import _inverse, _solve_reduced
from eqxjd._solver.common import members_first, natural_residual, solve_on_free_set

from .helpers import conflicting, jacobian_kinds, load_reference, low_rank, rel_err


SOLVERS = ("bpp", "nesterov_pgd", "qpax")


@eqx.filter_jit
def _project(gramian, lower, solver, reg_eps):
    projector = eqxjd.DualConeProjector(solver=solver, reg_eps=reg_eps, throw=False)
    return projector(gramian, lower)


@eqx.filter_jit
def _solve(solver, gramian, lower):
    return solver.solve(gramian, lower)


def _scaled_gramian(jacobian, reg_eps=1e-4, norm_eps=1e-4):
    """The canonical Gramian the solvers see (float64 numpy): normalised, regularised
    and Jacobi-scaled to a unit diagonal (a zero diagonal entry is left at 1)."""
    j = np.asarray(jacobian, np.float64)
    g = j @ j.T
    trace = np.trace(g)
    g = np.zeros_like(g) if trace < norm_eps else g / trace
    g = g + reg_eps * np.eye(g.shape[0])
    diag = np.diagonal(g)
    d = np.where(diag > 0, 1 / np.sqrt(np.where(diag > 0, diag, 1.0)), 1.0)
    g = g * d[:, None] * d[None, :]
    g[np.diag_indices_from(g)] = 1.0
    return g


def _normalised(jacobian, reg_eps=1e-4, norm_eps=1e-4):
    """TorchJD's G' (float64 numpy)."""
    j = np.asarray(jacobian, np.float64)
    g = j @ j.T
    trace = np.trace(g)
    g = np.zeros_like(g) if trace < norm_eps else g / trace
    return g + reg_eps * np.eye(g.shape[0])


def _unscaled(v, jacobian):
    """UPGrad's lanes V (rows for u = e_i) from the canonical solutions: Jacobi
    scaling maps lane e_i to e_i / d_i, hence V_ij = v_ij d_j / d_i."""
    d = 1 / np.sqrt(np.diagonal(_normalised(jacobian)))
    return v * d[None, :] / d[:, None]


def _enumerate(g, lower):
    """The exact solution for small m: the candidate of all 2^m free sets whose natural
    KKT residual is smallest (zero up to rounding)."""
    g, lower = np.asarray(g, np.float64), np.asarray(lower, np.float64)
    m = g.shape[0]
    out = []
    for u in lower:
        best, best_residual = None, np.inf
        for code in range(2**m):
            free = np.array([(code >> i) & 1 for i in range(m)], bool)
            v = u.copy()
            if np.any(free):
                block = g[np.ix_(free, free)]
                v[free] = np.linalg.solve(block, -(g[np.ix_(free, ~free)] @ u[~free]))
            residual = _natural_residual(g, u[None], v[None])
            if residual < best_residual:
                best, best_residual = v, residual
        out.append(best)
    return np.stack(out)


def _natural_residual(g, lower, v):
    natural = np.minimum(v - lower, v @ g)
    scale = np.maximum(1.0, np.max(np.abs(v), axis=-1))
    return float(np.max(np.max(np.abs(natural), axis=-1) / scale))


# --- KKT on every kind, for every solver ----------------------------------------------


def _kinds(key):
    # tests.helpers.conflicting relies on rank promotion.
    with jax.numpy_rank_promotion("allow"):
        return jacobian_kinds(key)


def _pad(g, lanes, size):
    """Embeds an m-dimensional problem in a `size`-dimensional one (a decoupled
    identity block with zero bounds, whose solution is 0): one compilation for all m."""
    m = g.shape[0]
    big = np.eye(size)
    big[:m, :m] = g
    big_lanes = np.zeros((size, size))
    big_lanes[: lanes.shape[0], :m] = lanes
    return big, big_lanes


def _solve_batch(solver, problems, size):
    # A loop over padded problems: one compilation per size. (Under vmap, every
    # problem would run as many steps as the slowest one.)
    out, results = [], []
    for g, lanes in problems:
        big, big_lanes = _pad(g, lanes, size)
        v, result = _solve(solver, jnp.asarray(big), jnp.asarray(big_lanes))
        v = np.asarray(v)
        m = g.shape[0]
        assert np.max(np.abs(v[:, m:]), initial=0.0) < 1e-14
        out.append(v[: lanes.shape[0], :m])
        results.append(result == eqxjd.RESULTS.successful)
    return out, jnp.array(results)


@eqx.filter_jit
def _batched_solve(solver, gramians, lowers):
    return jax.vmap(solver.solve)(gramians, lowers)


@pytest.mark.parametrize("solver", SOLVERS)
def test_kkt_on_every_kind(solver):
    # The solvers on the canonical (regularised) problems; singular Gramians
    # (reg_eps = 0) reach them through the projector only (next test).
    solver = to_solver(solver)
    problems, names = [], []
    for name, jacobian in _kinds(jr.key(0)).items():
        m = jacobian.shape[0]
        problems.append((_scaled_gramian(jacobian), np.eye(m)))
        names.append(name)
    solutions, results = _solve_batch(solver, problems, 9)
    assert bool(jnp.all(results)), results
    for (g, lanes), v, name in zip(problems, solutions, names):
        assert np.all(np.isfinite(v)), name
        residual = _natural_residual(g, lanes, v)
        assert residual <= 1e-10, (name, residual)


@pytest.mark.parametrize("solver", SOLVERS)
def test_kkt_on_every_kind_without_regularisation(solver):
    # reg_eps = 0: singular Gramians (low rank, m > n, zero), solved exactly by the
    # projector around every solver.
    projector = eqxjd.DualConeProjector(solver=solver, reg_eps=0.0, throw=False)
    solve = eqx.filter_jit(projector.solve)
    for name, jacobian in _kinds(jr.key(0)).items():
        m = jacobian.shape[0]
        solution = solve(jacobian @ jacobian.T, jnp.eye(m))
        assert solution.result == eqxjd.RESULTS.successful, name
        v = np.asarray(solution.value)
        g = _normalised(jacobian, 0.0)
        assert _natural_residual(g, np.eye(m), v) <= 1e-10, name


def test_zero_gramian():
    for name in SOLVERS:
        v = _project(jnp.zeros((4, 4)), jnp.eye(4), to_solver(name), jnp.asarray(0.0))
        assert jnp.array_equal(v, jnp.eye(4))


# --- exactness against quadprog (TorchJD's solver) ------------------------------------


_QP_NAMES = {
    "bpp": None,  # every fixture
    "nesterov_pgd": (
        "normal_4",
        "normal_6",
        "strong_1",
        "nonweak_3",
        "illcond_1",
        "illcond_6",
        "mgtn_0",
        "corr_1",
        "base",
        "5x7",
    ),
    "qpax": ("normal_4", "normal_6", "strong_1", "illcond_1", "corr_1", "base", "5x7"),
}


def _in_group(m, size):
    return m <= 16 if size == 16 else 16 < m <= size


@pytest.mark.parametrize("solver", SOLVERS)
def test_quadprog_reference(solver):
    data = load_reference("foundation")
    names = _QP_NAMES[solver]
    if names is None:
        names = sorted(k.split("/")[1] for k in data if k.startswith("qp/"))
    solver = to_solver(solver)
    worst = {}
    for size in (16, 64):
        group = [n for n in names if _in_group(data[f"J/{n}"].shape[0], size)]
        if not group:
            continue
        problems = []
        for name in group:
            m = data[f"J/{name}"].shape[0]
            problems.append((_scaled_gramian(data[f"J/{name}"]), np.eye(m)))
        solutions, results = _solve_batch(solver, problems, size)
        assert bool(jnp.all(results))
        for name, v in zip(group, solutions):
            m = v.shape[0]
            # Homogeneity: the reference lanes are e_i / m.
            v = _unscaled(v, data[f"J/{name}"])
            worst[name] = rel_err(v / m, data[f"qp/{name}/V"])
    assert max(worst.values()) <= 1e-9, worst


def test_quadprog_reference_m128():
    data = load_reference("foundation_large")
    for name in ("illcond_4",):
        jacobian = jnp.asarray(data[f"J/{name}"])
        m = jacobian.shape[0]
        v = _project(
            jacobian @ jacobian.T, jnp.eye(m) / m, eqxjd.BPP(), jnp.asarray(1e-4)
        )
        assert rel_err(v, data[f"qp/{name}/V"]) <= 1e-9, name


def test_quadprog_reference_unregularised():
    # qp0: norm_eps = reg_eps = 0 on full-rank Jacobians, through the driver.
    data = load_reference("foundation")
    for name in ("normal_5",):
        jacobian = jnp.asarray(data[f"J/{name}"])
        m = jacobian.shape[0]
        v = _project(
            jacobian @ jacobian.T, jnp.eye(m) / m, eqxjd.BPP(), jnp.asarray(0.0)
        )
        # norm_eps = 1e-4 is inactive here (trace >> 1e-4).
        assert rel_err(v, data[f"qp0/{name}/V"]) <= 1e-9, name


@pytest.mark.parametrize("solver", SOLVERS)
def test_float32(solver):
    # Without x64 the QP is solved in float32: the floor is about kappa * eps.
    data = load_reference("foundation")
    solver = to_solver(solver)
    names = ("normal_4", "normal_6", "5x7")
    gs, ls = zip(
        *[
            _pad(_scaled_gramian(data[f"J/{n}"]), np.eye(data[f"J/{n}"].shape[0]), 16)
            for n in names
        ]
    )
    vs, results = _batched_solve(
        solver,
        jnp.asarray(np.stack(gs), jnp.float32),
        jnp.asarray(np.stack(ls), jnp.float32),
    )
    assert vs.dtype == jnp.float32
    assert bool(jnp.all(results == eqxjd.RESULTS.successful))
    for name, v in zip(names, np.asarray(vs, np.float64)):
        m = data[f"J/{name}"].shape[0]
        # The reference lanes are e_i / m; rescale by homogeneity.
        v = _unscaled(v[:m, :m], data[f"J/{name}"])
        assert rel_err(v / m, data[f"qp/{name}/V"]) <= 1e-4, name


# --- reg_eps = 0: exactly non-conflicting on rank-deficient Jacobians -----------------


@pytest.mark.parametrize("solver", SOLVERS)
def test_reg_eps_zero_rank_deficient_is_non_conflicting(solver):
    upgrad = eqx.filter_jit(eqxjd.UPGrad(reg_eps=0.0, solver=solver))
    kinds = _kinds(jr.key(2))
    # Duplicated rows: G is exactly singular, G_FF can be singular; the guard decides.
    base = jr.normal(jr.key(3), (3, 10))
    duplicated = jnp.concatenate([base, base, -base[:1], base[1:2] + base[2:3]], axis=0)
    # m = 64 with rank 3: breakdowns are only detected if reductions see the NaNs of a
    # failed factorisation (XLA:CPU's max/min reductions drop them from 4096 elements).
    # Positive combinations of three rows: a pointed cone, so d is not ~0.
    wide = jnp.abs(jr.normal(jr.key(15), (64, 3))) @ jr.normal(jr.key(16), (3, 20))
    for name, jacobian in (
        ("low_rank", kinds["low_rank"]),
        ("low_rank_spread", kinds["low_rank_spread"]),
        ("duplicated", duplicated),
        ("rank_3_of_64", wide),
    ):
        d = upgrad(jacobian)
        assert bool(jnp.all(jnp.isfinite(d))), name
        scale = float(jnp.max(jnp.linalg.norm(jacobian, axis=1)) * jnp.linalg.norm(d))
        assert float(jnp.min(jacobian @ d)) >= -1e-10 * max(scale, 1e-300), name


@pytest.mark.parametrize("solver", SOLVERS)
def test_reg_eps_zero_more_rows_than_parameters(solver):
    # 64 Gaussian rows in 25 dimensions: the dual cone is {0}, so d = 0, although the
    # weights are not unique (G is singular). Every solver must get there, and say so.
    weighting = eqxjd.UPGradWeighting(reg_eps=0.0, solver=solver, throw=False)
    solve = eqx.filter_jit(lambda jacobian: weighting.solve(jacobian @ jacobian.T))
    for seed in range(1, 4):
        jacobian = jnp.asarray(np.random.default_rng(seed).standard_normal((64, 25)))
        solution = solve(jacobian)
        assert solution.result == eqxjd.RESULTS.successful, seed
        d = solution.value @ jacobian
        mean = jnp.linalg.norm(jnp.mean(jacobian, axis=0))
        assert float(jnp.linalg.norm(d) / mean) <= 1e-8, seed


def test_documented_bound_with_the_default_ridge():
    # (J d)_j >= -reg_eps tr(G) w_j, tight for a small gradient next to a large one;
    # reg_eps = 0 removes the conflict.
    s = 0.01
    small = s * jnp.array([-1.0, 0.2]) / jnp.linalg.norm(jnp.array([-1.0, 0.2]))
    jacobian = jnp.stack([jnp.array([1.0, 0.0]), small])
    trace = jnp.sum(jacobian**2)
    for cls in (eqxjd.UPGrad, eqxjd.DualProj):
        agg = cls()
        w, y = agg.weights(jacobian), jacobian @ agg(jacobian)
        bound = -1e-4 * trace * w
        assert bool(jnp.all(y >= bound - 1e-15)), cls
        assert float(y[1]) < 0, cls  # the ridge does let d conflict with row 2
        strict = cls(norm_eps=0.0, reg_eps=0.0)
        assert float(jnp.min(jacobian @ strict(jacobian))) >= -1e-15, cls


def test_nesterov_pgd_exact_on_ill_conditioned_rows():
    # 3 x 8 Jacobians with rows scaled by 10^U(-1.5, 1.5): the answer of the iteration
    # is the exact solve on its support, so it matches an exact reference to rounding.
    solve = eqx.filter_jit(
        eqxjd.DualConeProjector(solver="nesterov_pgd", throw=False).solve
    )
    worst = 0.0
    for seed in range(20):
        rng = np.random.default_rng(seed)
        jacobian = rng.standard_normal((3, 8)) * 10 ** rng.uniform(-1.5, 1.5, (3, 1))
        solution = solve(jnp.asarray(jacobian @ jacobian.T), jnp.eye(3))
        assert solution.result == eqxjd.RESULTS.successful, seed
        reference = _enumerate(_normalised(jacobian), np.eye(3))
        worst = max(worst, rel_err(solution.value, jnp.asarray(reference)))
    assert worst <= 1e-12, worst


def test_indefinite_gramian_has_its_own_result():
    gramian = jnp.array([[1.0, 2.0, 0.0], [2.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    for name in SOLVERS:
        projector = eqxjd.DualConeProjector(solver=name, throw=False)
        solution = projector.solve(gramian, jnp.eye(3))
        assert solution.result == eqxjd.RESULTS.indefinite_gramian, name
        assert bool(jnp.all(jnp.isnan(solution.value))), name
        assert bool(jnp.all(jnp.isnan(projector(gramian, jnp.eye(3))))), name
    weighting = eqxjd.UPGradWeighting(throw=False)
    assert weighting.solve(gramian).result == eqxjd.RESULTS.indefinite_gramian
    with pytest.raises(eqx.EquinoxRuntimeError, match="positive semi-definite"):
        eqxjd.UPGradWeighting()(gramian).block_until_ready()


def test_projector_and_shortcuts():
    projector = eqxjd.DualConeProjector(solver="qpax", reg_eps=0.0)
    for cls in (eqxjd.UPGrad, eqxjd.DualProj):
        by_keywords = cls(solver="qpax", reg_eps=0.0)
        assert eqx.tree_equal(by_keywords, cls(None, projector)) is True
        assert eqx.tree_equal(cls(), cls(projector=eqxjd.DualConeProjector())) is True
        for keyword in ("solver", "norm_eps", "reg_eps", "differentiable", "throw"):
            value = {"solver": "bpp", "differentiable": True, "throw": False}
            with pytest.raises(ValueError, match="not both"):
                cls(projector=projector, **{keyword: value.get(keyword, 0.0)})


# --- convergence reporting ------------------------------------------------------------


def _hard_gramian():
    jacobian = low_rank(jr.key(4), 8, 10, 3, spread=100.0)
    return jnp.asarray(_scaled_gramian(jacobian)), jacobian


@pytest.mark.parametrize(
    "solver",
    [
        eqxjd.BPP(max_steps=1),
        eqxjd.NesterovPGD(max_steps=10, check_every=10),
        eqxjd.QPax(max_iter=2, polish_steps=0),
    ],
)
def test_max_steps_reached(solver):
    g, jacobian = _hard_gramian()
    m = g.shape[0]
    _, result = _solve(solver, g, jnp.eye(m))
    assert result == eqxjd.RESULTS.max_steps_reached
    with pytest.raises(eqx.EquinoxRuntimeError):
        eqx.filter_jit(eqxjd.UPGrad(solver=solver))(jacobian).block_until_ready()
    d = eqx.filter_jit(eqxjd.UPGrad(solver=solver, throw=False))(jacobian)
    assert d.shape == (jacobian.shape[1],)


def test_kkt_residual_of_nonfinite_lanes_is_infinite():
    # 64 x 64 is large enough for XLA:CPU's max reduction to drop NaN (jax 0.10.2).
    g = jnp.eye(64)
    solution = jnp.zeros((64, 64)).at[:, 3].set(jnp.nan).at[0, 3].set(0.0)
    residual = natural_residual(g, jnp.zeros((64, 64)), solution)
    assert float(residual[0]) == 0.0
    assert bool(jnp.all(jnp.isinf(residual[1:])))


def test_nonfinite_does_not_hang():
    g = jnp.full((4, 4), jnp.nan)
    for name in SOLVERS:
        v, _ = _solve(to_solver(name), g, jnp.eye(4))
        assert v.shape == (4, 4)
    jacobian = jnp.ones((4, 3)).at[0, 0].set(jnp.nan)
    d = eqx.filter_jit(eqxjd.UPGrad(throw=False))(jacobian)
    assert bool(jnp.all(jnp.isnan(d)))


# --- construction ---------------------------------------------------------------------


def test_names_and_instances_agree():
    jacobian = _kinds(jr.key(5))["conflicting"]
    pairs: tuple[tuple[SolverName, type[eqxjd.AbstractQPSolver]], ...] = (
        ("bpp", eqxjd.BPP),
        ("nesterov_pgd", eqxjd.NesterovPGD),
        ("qpax", eqxjd.QPax),
    )
    for name, cls in pairs:
        assert isinstance(to_solver(name), cls)
        by_name = eqx.filter_jit(eqxjd.UPGrad(solver=name))(jacobian)
        by_instance = eqx.filter_jit(eqxjd.UPGrad(solver=cls()))(jacobian)
        assert jnp.array_equal(by_name, by_instance), name
    # The jaxtyping hook may reject the name first (TypeError).
    with pytest.raises((TypeError, ValueError)):
        to_solver("cvxpy")  # pyright: ignore[reportArgumentType]
    with pytest.raises((TypeError, ValueError)):
        eqxjd.UPGrad(solver="cvxpy")  # pyright: ignore[reportArgumentType]


def test_invalid_knobs():
    with pytest.raises(ValueError):
        eqxjd.BPP(max_steps=0)
    with pytest.raises(ValueError):
        eqxjd.NesterovPGD(check_every=0)
    with pytest.raises(ValueError):
        eqxjd.NesterovPGD(rtol=-1.0)
    with pytest.raises(ValueError):
        eqxjd.QPax(max_iter=0)


# --- jit, vmap, retracing -------------------------------------------------------------


@pytest.mark.parametrize("solver", SOLVERS)
def test_vmap_and_no_retrace(solver):
    solver = to_solver(solver)
    keys = jr.split(jr.key(6), 3)
    jacobians = jnp.stack([conflicting(k, 6, 5) for k in keys])
    gramians = jnp.einsum("bmn,bkn->bmk", jacobians, jacobians)
    lower = jnp.eye(6)

    @eqx.filter_jit
    @eqx.debug.assert_max_traces(max_traces=1)
    def batched(gramians):
        projector = eqxjd.DualConeProjector(solver=solver, throw=False)
        return jax.vmap(lambda g: projector(g, lower))(gramians)

    out = batched(gramians)
    loop = jnp.stack([_project(g, lower, solver, jnp.asarray(1e-4)) for g in gramians])
    assert rel_err(out, loop) <= 1e-12
    batched(gramians * 2.0)  # new values, no retrace


# --- invariances and general lower bounds ---------------------------------------------


@pytest.mark.parametrize("solver", SOLVERS)
def test_scale_invariance_and_homogeneity(solver):
    # Through the projector, which owns the rescaling.
    jacobian = low_rank(jr.key(7), 8, 10, 3, spread=100.0)
    g = jacobian @ jacobian.T
    lower = jnp.eye(8)
    v = _project(g, lower, solver, jnp.asarray(1e-4))
    for factor in (2.0**-4, 2.0**4):
        v_scaled = _project(g * factor, lower, solver, jnp.asarray(1e-4))
        assert rel_err(v_scaled, v) <= 1e-10
    v_homog = _project(g, 0.5 * lower, solver, jnp.asarray(1e-4))
    assert rel_err(v_homog, 0.5 * v) <= 1e-10


@pytest.mark.parametrize("solver", SOLVERS)
def test_general_lower_bounds(solver):
    # DualProj-like lanes of mixed sign, checked against exhaustive enumeration (exact).
    solver = to_solver(solver)
    jacobian = conflicting(jr.key(8), 6, 5)
    g = jnp.asarray(_scaled_gramian(jacobian))
    lower = jr.normal(jr.key(9), (5, 6))
    lower = lower / jnp.max(jnp.abs(lower), axis=-1, keepdims=True)
    lower = jnp.concatenate([lower, -jnp.abs(lower[:1])], axis=0)  # a lane with u <= 0
    v, result = _solve(solver, g, lower)
    assert result == eqxjd.RESULTS.successful
    reference = _enumerate(g, lower)
    assert rel_err(v, reference) <= 1e-10
    assert float(jnp.max(jnp.abs(v[-1]))) <= 1e-12
    assert _natural_residual(np.asarray(g), np.asarray(lower), np.asarray(v)) <= 1e-10


def test_small_m_closed_form():
    # m = 2: V_1 = [1, max(0, -b/c)], V_2 = [max(0, -b/a), 1]; TorchJD's documented
    # weights.
    jacobian = jnp.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
    for name in SOLVERS:
        w = eqxjd.UPGradWeighting(solver=name)(jacobian @ jacobian.T)
        assert rel_err(w, jnp.array([1.1109, 0.7894])) <= 1e-4
    # The projector solves m <= 2 in closed form, for every solver.
    g = jnp.array([[1.0, -0.5], [-0.5, 2.0]])
    expected = jnp.array([[1.0, 0.25], [0.5, 1.0]])
    for name in SOLVERS:
        projector = eqxjd.DualConeProjector(solver=name, norm_eps=0.0, reg_eps=0.0)
        solution = projector.solve(g, jnp.eye(2))
        assert solution.result == eqxjd.RESULTS.successful
        assert rel_err(solution.value, expected) <= 1e-14


# --- BPP's reduced (half-size primal or dual) solves and its full-size phase ----------


def test_members_first_is_a_stable_partition():
    mask = np.asarray(jr.bernoulli(jr.key(10), 0.5, (5, 9)))
    expected = np.argsort(~mask, axis=-1, kind="stable")
    assert np.array_equal(np.asarray(members_first(jnp.asarray(mask))), expected)
    assert np.array_equal(np.asarray(members_first(jnp.asarray(mask[0]))), expected[0])


@pytest.mark.parametrize("m", (5, 12))
def test_reduced_solves_match_full_size_solves(m):
    # Lanes with |F| <= m/2 solve on G_FF; the others on H_AA = (G^{-1})_AA. Both must
    # give the exact solution on their partition: slacks s_F and multipliers G(u + s)
    # off F, as the masked full-size solve does.
    jacobian = low_rank(jr.key(11), m, 3 * m, 3, spread=100.0)
    g, u = jnp.asarray(_scaled_gramian(jacobian)), jnp.eye(m)
    density = jnp.linspace(0.05, 0.95, m)[:, None]
    free = jr.uniform(jr.key(12), (m, m)) < density
    free = free & ~jnp.eye(m, dtype=bool)
    n_free = np.asarray(jnp.sum(free, axis=-1))
    assert np.any(2 * n_free > m) and np.any(2 * n_free <= m)
    inverse, ok = _inverse(g)
    assert bool(ok)
    pair = jnp.stack([g, inverse])
    slack, multiplier, broken = _solve_reduced(pair, u, -(u @ g), free)
    assert not bool(jnp.any(broken))
    expected = solve_on_free_set(g, u, free)
    assert rel_err(slack, expected) <= 1e-11
    expected_multiplier = jnp.where(free, 0.0, (u + expected) @ g)
    assert rel_err(jnp.where(free, 0.0, multiplier), expected_multiplier) <= 1e-11


def test_inverse_refuses_singular_gramians():
    # reg_eps = 0 on a rank-deficient Jacobian: the reduced solves are switched off.
    jacobian = low_rank(jr.key(13), 8, 20, 2, noise=0.0)
    g = jnp.asarray(_scaled_gramian(jacobian, 0.0))
    _, ok = _inverse(g)
    assert not bool(ok)


def test_full_size_phase_takes_over_from_the_reduced_phase():
    # The reduced phase may use half of max_steps; the full-size phase continues from
    # its partitions. Every budget either reports max_steps_reached or gives the exact
    # answer, and the smallest budget that succeeds (R >= 2 steps) needed both phases.
    jacobian = low_rank(jr.key(14), 16, 1000, 4, spread=100.0)
    g = jnp.asarray(_scaled_gramian(jacobian))
    lower = jnp.eye(16)
    reference, result = _solve(eqxjd.BPP(), g, lower)
    assert result == eqxjd.RESULTS.successful
    outcomes = []
    for steps in range(1, 9):
        v, result = _solve(eqxjd.BPP(max_steps=steps), g, lower)
        if result == eqxjd.RESULTS.successful:
            assert rel_err(v, reference) <= 1e-12, steps
        else:
            assert result == eqxjd.RESULTS.max_steps_reached, steps
        outcomes.append(bool(result == eqxjd.RESULTS.successful))
    first = outcomes.index(True) + 1
    assert first >= 3 and all(outcomes[first - 1 :]), outcomes
