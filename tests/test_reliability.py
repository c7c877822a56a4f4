"""The guarantees of docs/reliability.md: what every public aggregator, weighting and
scalarizer does with bad shapes and dtypes, NumPy input, NaN and infinities, extreme
scales, half precision, and the state after a non-finite step (m = 0 and the other
generic properties: test_generic.py).

Driven by the registry of tests/registry.py (one entry per public class). The scale and
state properties are
checked with hypothesis (derandomized; shapes fixed so that each method compiles once
per dtype, values varied).
"""

import zlib
from typing import Any, cast

import equinox as eqx
import eqxjd
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import pytest
from eqxjd import scalarization as sc

from .helpers import requires_x64, x64_enabled
from .registry import (
    Case,
    CASES,
    HOMOGENEOUS,
    IDS,
    jacobian as _jacobian,
    KEY,
    make_input as _input,
    run as _run,
    stat as _stat,
    STATEFUL,
    STATEFUL_TYPES,
    step,
)


X64 = x64_enabled()
F32 = jnp.dtype(jnp.float32)
F64 = jnp.dtype(jnp.float64)
DTYPES = (F32, F64) if X64 else (F32,)
HALF = (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16))
NORM_EPS = 1e-4


@pytest.fixture
def no_jaxtyping():
    # The test suite's type-check hook would reject bad input with its own TypeError
    # before eqxjd's ValueError, which is what users get.
    jaxtyping.config.update("jaxtyping_disable", True)
    yield
    jaxtyping.config.update("jaxtyping_disable", False)


def _as(x: np.ndarray, dtype) -> jax.Array:
    return jnp.asarray(np.asarray(x, np.float64).astype(dtype))


# -------------------------------------------------------------------- bad input


@pytest.mark.parametrize("name", IDS)
def test_bad_input_raises_value_error(name, no_jaxtyping):
    case = CASES[name]
    instance = case.make(case.rows)
    good = _input(name)
    bad = [good.astype(np.int32), good.astype(np.complex64)]
    if case.kind != "scalarizer":
        bad += [good[0], good[None], good[0, 0]]  # 1-D, 3-D, 0-D
    if case.reads == "gramian" and case.kind == "weighting":
        bad.append(good[:, :2])  # not square
    for x in bad:
        with pytest.raises(ValueError):
            _run(instance, jnp.asarray(x), init_from=good)
        if isinstance(instance, STATEFUL_TYPES):
            with pytest.raises(ValueError):
                instance.init(jnp.asarray(x))
    if case.kind == "aggregator":
        with pytest.raises(ValueError, match="real floating"):
            eqxjd.aggregate(
                cast(Any, instance),
                {"w": jnp.asarray(good, jnp.complex64)},
                None if not isinstance(instance, STATEFUL_TYPES) else {},
                key=KEY,
            )


@pytest.mark.parametrize(
    "make",
    [
        lambda: eqxjd.UPGrad(pref_vector=jnp.ones(3, jnp.complex64)),
        lambda: eqxjd.Constant(jnp.ones(3, jnp.complex64)),
        lambda: eqxjd.GradDrop(leak=jnp.ones(3, jnp.complex64)),
        lambda: sc.Constant(jnp.ones(3, jnp.complex64)),
        lambda: sc.STCH(0.5, reference=jnp.ones(3, jnp.complex64)),
        lambda: sc.FAMO(3, min_losses=jnp.ones(3, jnp.complex64)),
    ],
)
def test_complex_hyperparameters_raise(make, no_jaxtyping):
    with pytest.raises(ValueError, match="real"):
        make()


@pytest.mark.parametrize("name", STATEFUL)
def test_missing_state_says_what_to_do(name, no_jaxtyping):
    case = CASES[name]
    instance = case.make(case.rows)
    with pytest.raises(ValueError, match="init"):
        instance(jnp.asarray(_input(name)))


@pytest.mark.parametrize("name", IDS)
def test_numpy_input(name, no_jaxtyping):
    # Eager, as a user would call it (a NumPy Gramian used to reach a traced loop).
    case = CASES[name]
    instance = case.make(case.rows)
    x = _input(name).astype(np.float32)
    stateful = isinstance(instance, STATEFUL_TYPES)
    args = (instance.init(x),) if stateful else ()  # pyright: ignore[reportArgumentType]
    kwargs = {} if isinstance(instance, sc.AbstractStatefulScalarizer) else {"key": KEY}
    out = instance(x, *args, **kwargs)  # pyright: ignore[reportArgumentType]
    ref = instance(jnp.asarray(x), *args, **kwargs)
    assert eqx.tree_equal(out, ref, rtol=1e-6, atol=1e-6)


# -------------------------------------------------------------------- NaN and inf


@pytest.mark.parametrize("value", [np.nan, np.inf])
@pytest.mark.parametrize("name", IDS)
def test_nonfinite_input(name, value):
    case = CASES[name]
    instance = case.make(case.rows)
    jacobian = _jacobian(0, case.rows, case.cols)
    clean = _stat(case, jacobian)
    if case.kind == "scalarizer":
        x = clean.copy()
        x[1] = value
    else:
        jacobian[0, 1] = value
        x = _stat(case, jacobian)
    x = jnp.asarray(x, F32)
    # Eagerly, and under jit for the methods that mask non-finite values themselves
    # (stateful methods are run under jit by the state-recovery property).
    for jit in (False, True) if name in NONFINITE_UNDER_JIT else (False,):
        out, _ = _run(instance, x, init_from=jnp.asarray(clean, F32), jit=jit)
        _check_nonfinite(case, instance, x, jnp.asarray(clean, F32), out)


NONFINITE_UNDER_JIT = (
    "AlignedMTL",
    "AlignedMTLWeighting",
    "CAGrad",
    "CAGradWeighting",
    "ConFIG",
    "GradDrop",
    "Krum",
    "KrumWeighting",
    "Mean",
    "PCGrad",
    "PCGradWeighting",
    "TrimmedMean",
)


def _check_nonfinite(case, instance, x, clean, out):
    finite = np.isfinite(np.asarray(out))
    if case.nonfinite == "all":
        assert np.all(np.isnan(np.asarray(out)))
    elif case.nonfinite == "columns":
        assert not finite[1] and np.all(np.delete(finite, 1))
    elif case.nonfinite == "trimmed":
        assert np.all(finite)
    elif case.nonfinite == "previous":
        weights, _ = instance.weights(x, instance.init(x), key=KEY)
        assert np.all(np.isfinite(weights))
        assert not finite[1] and np.all(np.delete(finite, 1))
    elif case.nonfinite == "ignored":
        ref, _ = _run(instance, clean)
        np.testing.assert_array_equal(out, ref)
    else:
        assert not np.all(finite)


@pytest.mark.parametrize("name", STATEFUL)
def test_nonfinite_step_leaves_state_unchanged(name):
    case = CASES[name]
    instance = case.make(case.rows)
    clean = jnp.asarray(_input(name), F32)
    _, state = _step(name, instance, clean, None)
    bad = jnp.asarray(_input(name, seed=1), F32)
    bad = bad.reshape(-1).at[0].set(jnp.nan).reshape(bad.shape)
    _, after = _step(name, instance, bad, state)
    assert eqx.tree_equal(after, state)


# ------------------------------------------------------------- half precision


@pytest.mark.parametrize("name", IDS)
def test_half_precision_is_float32_cast_back(name):
    case = CASES[name]
    instance = case.make(case.rows)
    dtypes = HALF if case.kind != "weighting" else HALF[:1]
    for half in dtypes:
        x = _as(_input(name), half)
        out, _ = _run(instance, x)
        ref, _ = _run(instance, x.astype(F32))
        assert out.dtype == half
        assert np.all(np.isfinite(np.asarray(out, np.float32)))
        if case.half_exact:
            np.testing.assert_array_equal(out, ref.astype(half))
        else:
            np.testing.assert_allclose(
                np.asarray(out, np.float32), np.asarray(ref, np.float32), rtol=1e-2
            )


# ----------------------------------------------------------------- extreme scales


def _extremes(case: Case, dtype) -> tuple[float, ...]:
    # The factor applied to the Jacobian (the Gramian gets its square; the losses of a
    # scalarizer get the factor itself).
    if case.kind == "weighting" and case.reads == "gramian":
        return (1e-18, 1e18) if dtype == F32 else (1e-150, 1e150)
    return (1e-20, 1e20) if dtype == F32 else (1e-250, 1e250)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", IDS)
def test_extreme_scales_give_finite_output(name, dtype):
    case = CASES[name]
    instance = case.make(case.rows)
    jacobian = _jacobian(0, case.rows, case.cols)
    for c in _extremes(case, dtype):
        scaled = jacobian * c
        x = _as(_stat(case, scaled), dtype)
        out, state = _run(instance, x)
        assert out.dtype == dtype
        assert np.all(np.isfinite(np.asarray(out))), (c, out)
        if state is not None:
            assert all(np.all(np.isfinite(leaf)) for leaf in _float_leaves(state))


def _float_leaves(tree):
    leaves = jax.tree.leaves(tree)
    return [np.asarray(x) for x in leaves if jnp.issubdtype(x.dtype, jnp.inexact)]


# ------------------------------------------------------- scale equivariance property


def _scale_bits(dtype, case: Case) -> int:
    # Powers of two (exact scalings) from about 1e-20 to 1e20 (float32) or 1e-250 to
    # 1e250 (float64); weightings get the Gramian of such a Jacobian.
    if case.kind == "weighting" and case.reads == "gramian":
        return 55 if dtype == F32 else 500
    return 66 if dtype == F32 else 830


def _expected(name, instance, jacobian, dtype, j):
    """The output at 2^j J (weightings: 4^j G) predicted from the output at a unit
    scale, and whether the point is too close to the cliff to be asserted."""
    case = CASES[name]
    unit, _ = _run(instance, _as(_stat(case, jacobian), dtype))
    unit = np.asarray(unit, np.float64)
    # log2 of tr(G) / norm_eps at the scaled point.
    margin = np.log2(np.sum(jacobian**2)) + 2 * j - np.log2(NORM_EPS)
    if case.cliff is not None and abs(margin) < 1e-3:
        return None
    if case.cliff is not None and margin < 0:
        if case.cliff == "zero":
            return np.zeros_like(unit)
        m = jacobian.shape[0]
        weights = np.full(m, 1 / m)
        return weights if case.kind == "weighting" else 2.0**j * weights @ jacobian
    return 2.0 ** (j * case.degree) * unit


def _check_scale(name, dtype, seed, j):
    case = CASES[name]
    instance = case.make(case.rows)
    jacobian = _jacobian(seed, case.rows, case.cols)
    expected = _expected(name, instance, jacobian, dtype, j)
    hypothesis.assume(expected is not None)
    assert expected is not None
    out, _ = _run(instance, _scaled(_as(_stat(case, jacobian), dtype), j, case))
    assert out.dtype == dtype
    out = np.asarray(out, np.float64)
    # Tolerance relative to the size of the terms of the output.
    size = max(np.abs(expected).max(initial=0.0), 2.0 ** (j * case.degree))
    tol = 1e-4 if dtype == F32 else 1e-9
    np.testing.assert_allclose(out, expected, rtol=tol, atol=tol * size)


def _scaled(x, j, case):
    # 2^j (or 4^j for a Gramian) applied in two exact steps, as one power may not be
    # representable.
    power = 2 * j if case.kind == "weighting" and case.reads == "gramian" else j
    half = power // 2
    x = x * jnp.asarray(2.0**half, x.dtype)
    return x * jnp.asarray(2.0 ** (power - half), x.dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", HOMOGENEOUS)
def test_scale_equivariance(name, dtype):
    bits = _scale_bits(dtype, CASES[name])
    # Derandomized draws are the same for every test that shares this code: shift
    # them by the case, so that each method sees its own scales (the two ends of the
    # range are always tried).
    offset = zlib.crc32(f"{name}-{dtype}".encode())

    @hypothesis.settings(max_examples=20, deadline=None, derandomize=True)
    @hypothesis.given(seed=st.integers(0, 2**16), u=st.integers(0, 2**32))
    @hypothesis.example(seed=1, u=-offset % (2 * bits + 1))
    @hypothesis.example(seed=2, u=(2 * bits - offset) % (2 * bits + 1))
    def check(seed, u):
        _check_scale(name, dtype, seed + offset, (u + offset) % (2 * bits + 1) - bits)

    check()


# ----------------------------------------------------------- state recovery property


_jitted_step = eqx.filter_jit(step)


def _step(name, instance, x, state):
    """One jitted step of a stateful method from `state` (`None`: from `init`)."""
    if state is None:
        state = instance.init(x)
    return _jitted_step(instance, x, state)


@pytest.mark.parametrize("name", STATEFUL)
def test_state_recovers_after_a_nonfinite_step(name):
    case = CASES[name]
    instance = case.make(case.rows)

    @hypothesis.settings(max_examples=20, deadline=None, derandomize=True)
    @hypothesis.given(
        seeds=st.lists(st.integers(0, 2**16), min_size=3, max_size=3),
        where=st.integers(0, 10**6),
        value=st.sampled_from([np.nan, np.inf, -np.inf]),
    )
    def check(seeds, where, value):
        first, bad, after = (jnp.asarray(_input(name, s), F32) for s in seeds)
        bad = bad.reshape(-1).at[where % bad.size].set(value).reshape(bad.shape)
        _, state = _step(name, instance, first, None)
        out, state_bad = _step(name, instance, bad, state)
        assert eqx.tree_equal(state_bad, state)
        if case.kind != "scalarizer":
            assert not np.all(np.isfinite(np.asarray(out)))
        out_after, state_after = _step(name, instance, after, state_bad)
        ref_after, ref_state = _step(name, instance, after, state)
        assert np.all(np.isfinite(np.asarray(out_after)))
        assert eqx.tree_equal(out_after, ref_after)
        assert eqx.tree_equal(state_after, ref_state)

    check()


# --------------------------------------------------------------- regressions


def test_cagrad_zero_in_the_hull_gives_zero_in_float32():
    # The convex hull of the rows contains 0, so for c > 1 the exact output is 0
    # (TorchJD in float32 and eqxjd in float64 agree); the float32 ridge used to keep
    # |J^T w| above norm_eps.
    J = jnp.asarray(np.random.default_rng(0).standard_normal((4, 3)), F32)
    out = eqxjd.CAGrad(2.0)(J)
    np.testing.assert_array_equal(out, np.zeros(3))


@requires_x64
def test_cagrad_zero_in_the_hull_gives_zero_in_float64():
    J = jnp.asarray(np.random.default_rng(0).standard_normal((4, 3)), F64)
    np.testing.assert_array_equal(eqxjd.CAGrad(2.0)(J), np.zeros(3))


@pytest.mark.parametrize("mu", [0.01, 0.5])
def test_stch_large_losses_under_jit(mu):
    stch = sc.STCH(mu)
    losses = jnp.array([1e30, 2e30, 5e29], F32)
    for jit in (False, True):
        fn = eqx.filter_jit(stch) if jit else stch
        grad = jax.jit(jax.grad(stch)) if jit else jax.grad(stch)
        assert float(fn(losses)) == pytest.approx(2e30 / 3, rel=1e-6)
        np.testing.assert_allclose(grad(losses), [0, 1 / 3, 0], atol=1e-7)


def test_scalarizers_accept_lists(no_jaxtyping):
    pbi = sc.PBI(5.0, [0.2, 0.3, 0.5])  # pyright: ignore[reportArgumentType]
    for scalarizer in (sc.Mean(), pbi, sc.STCH(0.5)):
        losses = [1.0, 2.0, 3.0]
        assert np.isfinite(float(scalarizer(losses)))  # pyright: ignore[reportArgumentType]


def test_aggregate_rescales_pytree_gramians():
    # A pytree Jacobian whose Gramian overflows float32: the same update as for the
    # concatenated matrix, and 1e20 times the update at unit scale.
    J = _jacobian(3, 3, 5)
    tree = {
        "a": jnp.asarray(J[:, :2] * 1e20, F32),
        "b": jnp.asarray(J[:, 2:] * 1e20, F32),
    }
    out = eqxjd.aggregate(eqxjd.MGDA(), tree)
    flat = eqxjd.MGDA()(jnp.asarray(J, F32))
    joined = np.concatenate([out.update["a"], out.update["b"]]) / 1e20
    np.testing.assert_allclose(joined, flat, rtol=1e-4, atol=1e-6)
