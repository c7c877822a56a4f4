"""The guarantees of docs/reliability.md: what every public aggregator, weighting and
scalarizer does with bad shapes and dtypes, NumPy input, m = 0, NaN and infinities,
extreme scales, half precision, and the state after a non-finite step.

One table row per public class (`CASES`); `test_every_public_class_is_in_the_table`
fails when a new public method is not covered. The scale and state properties are
checked with hypothesis (derandomized; shapes fixed so that each method compiles once
per dtype, values varied).
"""

import dataclasses
import inspect
import zlib
from collections.abc import Callable
from typing import Any, cast

import equinox as eqx
import eqxjd
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import jax.random as jr
import jaxtyping
import numpy as np
import pytest
from eqxjd import scalarization as sc

from .helpers import requires_x64, x64_enabled


X64 = x64_enabled()
F32 = jnp.dtype(jnp.float32)
F64 = jnp.dtype(jnp.float64)
DTYPES = (F32, F64) if X64 else (F32,)
HALF = (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16))
KEY = jr.key(0)
NORM_EPS = 1e-4


@dataclasses.dataclass(frozen=True)
class Case:
    """One row of the reliability table.

    - `make(m)`: an instance for `m` objectives.
    - `kind`: "aggregator", "weighting" or "scalarizer".
    - `reads`: for weightings, the statistic built from a Jacobian.
    - `rows`, `cols`: the shape of the Jacobians used (`m < n`, full rank).
    - `empty`: `m = 0` gives "zeros" (aggregators: `zeros(n)`; weightings: `(0,)`;
      scalarizers: `0`), "nan" or "error" (`ValueError`).
    - `nonfinite`: "all" (all-NaN output), "columns" (non-finite only in the affected
      coordinate), "trimmed" (trimmed away), "previous" (NashMTL keeps its previous
      weights), "ignored" (weightings that read only the number of rows), "ieee"
      (scalarizers: a non-finite scalar).
    - `degree`: the output at `c J` (weightings: at `c^2 G`) is `c^degree` times the
      output at `J`, for every `c > 0`; `None` when not homogeneous.
    - `cliff`: below `tr(G) < norm_eps` the output is that of Mean ("mean") or 0
      ("zero").
    - `half_exact`: half precision gives exactly the float32 result, cast back.
    - `table`: `False` for variants that only enter the scale property (a class is
      covered by its main row).
    """

    make: Callable[[int], Any]
    kind: str
    reads: str = "gramian"
    rows: int = 3
    cols: int = 5
    empty: str = "zeros"
    nonfinite: str = "all"
    degree: float | None = None
    cliff: str | None = None
    half_exact: bool = True
    table: bool = True


def _agg(make, **kw):
    return Case(make, "aggregator", **kw)


def _wt(make, reads="gramian", **kw):
    return Case(make, "weighting", reads=reads, **kw)


def _sc(make, **kw):
    return Case(make, "scalarizer", **kw)


def _pref(m):
    return jnp.arange(1.0, m + 1.0)


CASES: dict[str, Case] = {
    # Aggregators.
    "UPGrad": _agg(lambda m: eqxjd.UPGrad(), degree=1, cliff="mean"),
    "DualProj": _agg(lambda m: eqxjd.DualProj(), degree=1, cliff="mean"),
    "MGDA": _agg(lambda m: eqxjd.MGDA(), degree=1),
    "CAGrad": _agg(lambda m: eqxjd.CAGrad(0.5), degree=1, cliff="zero"),
    "AlignedMTL": _agg(lambda m: eqxjd.AlignedMTL(), degree=1),
    "IMTLG": _agg(lambda m: eqxjd.IMTLG(), degree=1),
    "Krum": _agg(lambda m: eqxjd.Krum(1), rows=4, empty="error", degree=1),
    "PCGrad": _agg(lambda m: eqxjd.PCGrad(), degree=1),
    "FairGrad": _agg(lambda m: eqxjd.FairGrad(1.0), degree=0),
    "ConFIG": _agg(lambda m: eqxjd.ConFIG(), degree=1),
    "GradDrop": _agg(lambda m: eqxjd.GradDrop(), nonfinite="columns", degree=1),
    "TrimmedMean": _agg(
        lambda m: eqxjd.TrimmedMean(1), empty="error", nonfinite="trimmed", degree=1
    ),
    "Mean": _agg(lambda m: eqxjd.Mean(), nonfinite="columns", degree=1),
    "Sum": _agg(lambda m: eqxjd.Sum(), nonfinite="columns", degree=1),
    "Constant": _agg(lambda m: eqxjd.Constant(_pref(m)), nonfinite="columns", degree=1),
    "Random": _agg(lambda m: eqxjd.Random(), nonfinite="columns", degree=1),
    "GradVac": _agg(lambda m: eqxjd.GradVac()),
    "GradVac_eps0": _agg(lambda m: eqxjd.GradVac(eps=0.0), degree=1, table=False),
    "PCD": _agg(lambda m: eqxjd.PCD()),
    "PCD_eps0": _agg(lambda m: eqxjd.PCD(eps=0.0), degree=1, table=False),
    "ExcessMTL": _agg(lambda m: eqxjd.ExcessMTL()),
    "NashMTL": _agg(
        lambda m: eqxjd.NashMTL(max(m, 1)),
        empty="error",
        nonfinite="previous",
        degree=0,
    ),
    "WeightedAggregator": _agg(
        lambda m: eqxjd.WeightedAggregator(eqxjd.MGDAWeighting()),
        degree=1,
    ),
    "StatefulWeightedAggregator": _agg(
        lambda m: eqxjd.StatefulWeightedAggregator(
            eqxjd.CRMOGMWeighting(eqxjd.MGDAWeighting())  # pyright: ignore[reportCallIssue]
        ),
        degree=1,
    ),
    # Weightings (degree: of the weights under G -> c^2 G).
    "UPGradWeighting": _wt(
        lambda m: eqxjd.UPGradWeighting(), degree=0, cliff="mean", half_exact=False
    ),
    "DualProjWeighting": _wt(
        lambda m: eqxjd.DualProjWeighting(), degree=0, cliff="mean", half_exact=False
    ),
    "MGDAWeighting": _wt(lambda m: eqxjd.MGDAWeighting(), degree=0),
    "CAGradWeighting": _wt(
        lambda m: eqxjd.CAGradWeighting(0.5), degree=0, cliff="zero"
    ),
    "AlignedMTLWeighting": _wt(lambda m: eqxjd.AlignedMTLWeighting(), degree=0),
    "IMTLGWeighting": _wt(lambda m: eqxjd.IMTLGWeighting(), degree=0),
    "KrumWeighting": _wt(
        lambda m: eqxjd.KrumWeighting(1), rows=4, empty="error", degree=0
    ),
    "PCGradWeighting": _wt(lambda m: eqxjd.PCGradWeighting(), degree=0),
    "FairGradWeighting": _wt(lambda m: eqxjd.FairGradWeighting(1.0), degree=-1),
    "GradVacWeighting": _wt(lambda m: eqxjd.GradVacWeighting()),
    "PCDWeighting": _wt(lambda m: eqxjd.PCDWeighting()),
    "MoDoWeighting": _wt(lambda m: eqxjd.MoDoWeighting()),
    "SDMGradWeighting": _wt(lambda m: eqxjd.SDMGradWeighting()),
    "ExcessMTLWeighting": _wt(lambda m: eqxjd.ExcessMTLWeighting(), reads="matrix"),
    "CRMOGMWeighting": _wt(
        lambda m: eqxjd.CRMOGMWeighting(eqxjd.MGDAWeighting()),  # pyright: ignore[reportCallIssue]
        degree=0,
    ),
    "MeanWeighting": _wt(
        lambda m: eqxjd.MeanWeighting(), reads="rows", nonfinite="ignored", degree=0
    ),
    "SumWeighting": _wt(
        lambda m: eqxjd.SumWeighting(), reads="rows", nonfinite="ignored", degree=0
    ),
    "ConstantWeighting": _wt(
        lambda m: eqxjd.ConstantWeighting(_pref(m)),
        reads="rows",
        nonfinite="ignored",
        degree=0,
    ),
    "RandomWeighting": _wt(
        lambda m: eqxjd.RandomWeighting(), reads="rows", nonfinite="ignored", degree=0
    ),
    # Scalarizers.
    "scalarization.Mean": _sc(lambda m: sc.Mean(), empty="nan", nonfinite="ieee"),
    "scalarization.Sum": _sc(lambda m: sc.Sum(), nonfinite="ieee"),
    "scalarization.Constant": _sc(lambda m: sc.Constant(_pref(m)), nonfinite="ieee"),
    "scalarization.Random": _sc(lambda m: sc.Random(), nonfinite="ieee"),
    "scalarization.GeometricMean": _sc(lambda m: sc.GeometricMean(), nonfinite="ieee"),
    "scalarization.COSMOS": _sc(lambda m: sc.COSMOS(1.0, _pref(m)), nonfinite="ieee"),
    "scalarization.STCH": _sc(lambda m: sc.STCH(0.01, _pref(m)), nonfinite="ieee"),
    "scalarization.PBI": _sc(lambda m: sc.PBI(5.0, _pref(m)), nonfinite="ieee"),
    "scalarization.UW": _sc(lambda m: sc.UW(m), nonfinite="ieee"),
    "scalarization.IMTLL": _sc(lambda m: sc.IMTLL(m), nonfinite="ieee"),
    "scalarization.DWA": _sc(lambda m: sc.DWA(), nonfinite="ieee"),
    "scalarization.FAMO": _sc(lambda m: sc.FAMO(m), nonfinite="ieee"),
}
IDS = sorted(n for n in CASES if CASES[n].table)
STATEFUL_TYPES = (
    eqxjd.AbstractStatefulAggregator,
    eqxjd.AbstractStatefulWeighting,
    sc.AbstractStatefulScalarizer,
)
PUBLIC_BASES = (
    eqxjd.AbstractAggregator,
    eqxjd.AbstractStatefulAggregator,
    eqxjd.AbstractWeighting,
    eqxjd.AbstractStatefulWeighting,
    sc.AbstractScalarizer,
    sc.AbstractStatefulScalarizer,
)


def _stateful(name):
    return isinstance(CASES[name].make(CASES[name].rows), STATEFUL_TYPES)


STATEFUL = [n for n in IDS if _stateful(n)]
HOMOGENEOUS = sorted(n for n in CASES if CASES[n].degree is not None)


@pytest.fixture
def no_jaxtyping():
    # The test suite's type-check hook would reject bad input with its own TypeError
    # before eqxjd's ValueError, which is what users get.
    jaxtyping.config.update("jaxtyping_disable", True)
    yield
    jaxtyping.config.update("jaxtyping_disable", False)


# ---------------------------------------------------------------------------- inputs


def _jacobian(seed: int, m: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((m, n))


def _stat(case: Case, jacobian: np.ndarray) -> np.ndarray:
    """What `case` is called with, built in float64 NumPy from a Jacobian."""
    if case.kind == "scalarizer":
        return np.abs(jacobian[:, 0]) + 0.5  # positive losses
    if case.kind == "weighting" and case.reads == "gramian":
        return jacobian @ jacobian.T
    return jacobian


def _input(name: str, seed: int = 0, rows: int | None = None) -> np.ndarray:
    case = CASES[name]
    m = case.rows if rows is None else rows
    return _stat(case, _jacobian(seed, m, case.cols))


def _call(instance: Any, x: Any, state: Any, key: Any):
    if isinstance(instance, sc.AbstractStatefulScalarizer):
        return instance(x, state), state
    if isinstance(instance, STATEFUL_TYPES):
        return instance(x, state, key=key)
    return instance(x, key=key), None


# Eager calls run eqxjd's internally jitted kernels, so XLA compiles once per (class,
# shape, dtype) and the hypothesis properties, which vary values only, reuse them.
# `jit=True` runs the whole call under one outer jit (compiled once per class too).
_jitted_call = eqx.filter_jit(_call)


def _run(instance: Any, x: Any, state: Any = None, *, init_from=None, jit=False):
    """`(output, new state or None)`, through the public call (`init` first when
    `state` is None, from `init_from` if given)."""
    if isinstance(instance, STATEFUL_TYPES) and state is None:
        state = instance.init(x if init_from is None else init_from)
    return (_jitted_call if jit else _call)(instance, x, state, KEY)


def _as(x: np.ndarray, dtype) -> jax.Array:
    return jnp.asarray(np.asarray(x, np.float64).astype(dtype))


# ------------------------------------------------------------------------ coverage


def _public_classes():
    for module, prefix in ((eqxjd, ""), (sc, "scalarization.")):
        for name, obj in vars(module).items():
            if name.startswith("_") or not inspect.isclass(obj):
                continue
            if issubclass(obj, PUBLIC_BASES) and not inspect.isabstract(obj):
                if not name.startswith("Abstract"):
                    yield prefix + name, obj


def test_every_public_class_is_in_the_table():
    covered = {type(case.make(case.rows)) for case in CASES.values()}
    missing = [name for name, cls in _public_classes() if cls not in covered]
    assert not missing, f"add a row to CASES (and to docs/reliability.md): {missing}"


# -------------------------------------------------------------------- bad input


@pytest.mark.parametrize("name", IDS)
def test_bad_input_raises_value_error(name, no_jaxtyping):
    case = CASES[name]
    instance = case.make(case.rows)
    good = _input(name)
    bad = [good.astype(np.int32), good.astype(np.complex64)]
    if case.kind != "scalarizer":
        bad.append(good[0])  # 1-D
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


# --------------------------------------------------------------------------- m = 0


@pytest.mark.parametrize("name", IDS)
def test_zero_objectives(name):
    case = CASES[name]
    x = _input(name, rows=0) if case.kind != "scalarizer" else np.zeros((0,))
    if case.kind == "weighting" and case.reads == "gramian":
        x = np.zeros((0, 0))
    x = jnp.asarray(x, F32)
    if case.empty == "error":
        with pytest.raises(ValueError):
            _run(case.make(0), x)
        return
    out, _ = _run(case.make(0), x)
    expected = {"aggregator": (case.cols,), "weighting": (0,), "scalarizer": ()}
    assert out.shape == expected[case.kind] and out.dtype == F32
    if case.empty == "nan":
        assert bool(jnp.isnan(out))
    else:
        np.testing.assert_array_equal(out, np.zeros(out.shape))


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


@eqx.filter_jit
def _jitted_step(instance, x, state):
    if isinstance(instance, sc.DWA):
        state = instance.update(state, x)
        return instance(x, state), state
    if isinstance(instance, sc.FAMO):
        state = instance.update(state, x, 0.9 * x)
        return instance(x, state), state
    return _call(instance, x, state, KEY)


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
