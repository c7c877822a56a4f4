"""The registry of every public aggregator, weighting and scalarizer.

One `Case` per public class (plus a few variants), read by the generic tests
(test_generic.py: shapes, dtypes, jit, vmap, retracing, gradients, degenerate input,
keys, state) and by the reliability tests (test_reliability.py: bad input, NaN, extreme
scales, half precision). `test_every_public_class_is_in_the_registry` (test_generic.py)
fails when a new public class has no entry.
"""

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import equinox as eqx
import eqxjd
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from eqxjd import scalarization as sc


KEY = jr.key(0)


@dataclasses.dataclass(frozen=True)
class Case:
    """One entry of the registry.

    - `make(m)`: an instance for `m` objectives.
    - `kind`: "aggregator", "weighting" or "scalarizer".
    - `differentiable`: `True`: gradients through the output are the derivative
      (checked against finite differences); `False`: they are exactly zero; `None`:
      the method defines its own gradient (FAMO, as TorchJD; compared with TorchJD in
      test_reference.py), so only finiteness is generic.
    - `needs_key`: the method draws random numbers and requires `key=`.
    - `reads`: for weightings, the statistic built from a Jacobian ("gramian",
      "matrix" for the Jacobian itself, "rows" for weightings that only read `m`).
    - `rows`, `cols`: the shape of the Jacobians used (`m < n`, full rank).
    - `min_rows`: fewer rows than this raise `ValueError` (Krum, TrimmedMean).
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
    - `rtol`: float64 tolerance of jit against eager and vmap against a loop (float32:
      `rtol32`), relative to the largest entry.
    - `f32_rtol`: float32 output against float64 output, relative to the largest entry;
      `None` where the random draws depend on the dtype.
    - `vmap_lanes`: the lanes of the generic vmap batch (two random, then zero,
      rank-one and duplicate-rows inputs) compared with a loop; every lane must be
      finite. FairGrad has no root on the rank-deficient lanes (only finiteness).
    - `fd_rtol`: tolerance of forward-mode derivatives against central finite
      differences (float64).
    - `table`: `False` for variants that only enter the scale property of
      test_reliability.py (a class is covered by its main entry).
    """

    make: Callable[[int], Any]
    kind: str
    differentiable: bool | None
    needs_key: bool = False
    reads: str = "gramian"
    rows: int = 3
    cols: int = 5
    min_rows: int = 1
    empty: str = "zeros"
    nonfinite: str = "all"
    degree: float | None = None
    cliff: str | None = None
    half_exact: bool = True
    rtol: float = 1e-12
    rtol32: float = 1e-5
    f32_rtol: float | None = 1e-4
    fd_rtol: float = 1e-5
    vmap_lanes: tuple[int, ...] = (0, 1, 2, 3, 4)
    table: bool = True


def _agg(make, differentiable: bool | None, **kw):
    return Case(make, "aggregator", differentiable, **kw)


def _wt(make, differentiable: bool | None, reads="gramian", **kw):
    return Case(make, "weighting", differentiable, reads=reads, **kw)


def _sc(make, differentiable: bool | None = True, **kw):
    return Case(make, "scalarizer", differentiable, **kw)


def _pref(m):
    return jnp.arange(1.0, m + 1.0)


CASES: dict[str, Case] = {
    # Aggregators.
    "UPGrad": _agg(lambda m: eqxjd.UPGrad(), False, degree=1, cliff="mean"),
    "DualProj": _agg(lambda m: eqxjd.DualProj(), False, degree=1, cliff="mean"),
    "MGDA": _agg(lambda m: eqxjd.MGDA(), True, degree=1),
    "CAGrad": _agg(lambda m: eqxjd.CAGrad(0.5), False, degree=1, cliff="zero"),
    "AlignedMTL": _agg(lambda m: eqxjd.AlignedMTL(), True, degree=1),
    "IMTLG": _agg(lambda m: eqxjd.IMTLG(), False, degree=1),
    "Krum": _agg(
        lambda m: eqxjd.Krum(1), True, rows=4, min_rows=4, empty="error", degree=1
    ),
    "PCGrad": _agg(lambda m: eqxjd.PCGrad(), False, needs_key=True, degree=1),
    "FairGrad": _agg(
        lambda m: eqxjd.FairGrad(1.0), False, degree=0, rtol=1e-9, vmap_lanes=(0, 1, 2)
    ),
    "ConFIG": _agg(lambda m: eqxjd.ConFIG(), False, degree=1),
    "GradDrop": _agg(
        lambda m: eqxjd.GradDrop(),
        False,
        needs_key=True,
        nonfinite="columns",
        degree=1,
        f32_rtol=None,
    ),
    "TrimmedMean": _agg(
        lambda m: eqxjd.TrimmedMean(1),
        True,
        min_rows=3,
        empty="error",
        nonfinite="trimmed",
        degree=1,
    ),
    "Mean": _agg(lambda m: eqxjd.Mean(), True, nonfinite="columns", degree=1),
    "Sum": _agg(lambda m: eqxjd.Sum(), True, nonfinite="columns", degree=1),
    "Constant": _agg(
        lambda m: eqxjd.Constant(_pref(m)), True, nonfinite="columns", degree=1
    ),
    "Random": _agg(
        lambda m: eqxjd.Random(),
        True,
        needs_key=True,
        nonfinite="columns",
        degree=1,
        f32_rtol=None,
    ),
    "GradVac": _agg(lambda m: eqxjd.GradVac(), False, needs_key=True),
    "GradVac_eps0": _agg(
        lambda m: eqxjd.GradVac(eps=0.0), False, needs_key=True, degree=1, table=False
    ),
    "PCD": _agg(lambda m: eqxjd.PCD(), False),
    "PCD_eps0": _agg(lambda m: eqxjd.PCD(eps=0.0), False, degree=1, table=False),
    "ExcessMTL": _agg(lambda m: eqxjd.ExcessMTL(), False),
    "NashMTL": _agg(
        lambda m: eqxjd.NashMTL(max(m, 1)),
        False,
        empty="error",
        nonfinite="previous",
        degree=0,
    ),
    "WeightedAggregator": _agg(
        lambda m: eqxjd.WeightedAggregator(eqxjd.MGDAWeighting()), True, degree=1
    ),
    "StatefulWeightedAggregator": _agg(
        lambda m: eqxjd.StatefulWeightedAggregator(
            eqxjd.CRMOGMWeighting(eqxjd.MGDAWeighting())
        ),
        True,
        degree=1,
    ),
    # Weightings (degree: of the weights under G -> c^2 G).
    "UPGradWeighting": _wt(
        lambda m: eqxjd.UPGradWeighting(),
        False,
        degree=0,
        cliff="mean",
        half_exact=False,
    ),
    "DualProjWeighting": _wt(
        lambda m: eqxjd.DualProjWeighting(),
        False,
        degree=0,
        cliff="mean",
        half_exact=False,
    ),
    "MGDAWeighting": _wt(lambda m: eqxjd.MGDAWeighting(), True, degree=0),
    "CAGradWeighting": _wt(
        lambda m: eqxjd.CAGradWeighting(0.5), False, degree=0, cliff="zero"
    ),
    "AlignedMTLWeighting": _wt(lambda m: eqxjd.AlignedMTLWeighting(), True, degree=0),
    "IMTLGWeighting": _wt(lambda m: eqxjd.IMTLGWeighting(), False, degree=0),
    "KrumWeighting": _wt(
        lambda m: eqxjd.KrumWeighting(1),
        True,
        rows=4,
        min_rows=4,
        empty="error",
        degree=0,
    ),
    "PCGradWeighting": _wt(
        lambda m: eqxjd.PCGradWeighting(), False, needs_key=True, degree=0
    ),
    "FairGradWeighting": _wt(
        lambda m: eqxjd.FairGradWeighting(1.0),
        False,
        degree=-1,
        rtol=1e-9,
        vmap_lanes=(0, 1, 2),
    ),
    "GradVacWeighting": _wt(lambda m: eqxjd.GradVacWeighting(), False, needs_key=True),
    "PCDWeighting": _wt(lambda m: eqxjd.PCDWeighting(), False),
    "MoDoWeighting": _wt(lambda m: eqxjd.MoDoWeighting(), False),
    "SDMGradWeighting": _wt(lambda m: eqxjd.SDMGradWeighting(), False),
    "ExcessMTLWeighting": _wt(
        lambda m: eqxjd.ExcessMTLWeighting(), False, reads="matrix"
    ),
    "CRMOGMWeighting": _wt(
        lambda m: eqxjd.CRMOGMWeighting(eqxjd.MGDAWeighting()),
        True,
        degree=0,
    ),
    "MeanWeighting": _wt(
        lambda m: eqxjd.MeanWeighting(),
        True,
        reads="rows",
        nonfinite="ignored",
        degree=0,
    ),
    "SumWeighting": _wt(
        lambda m: eqxjd.SumWeighting(),
        True,
        reads="rows",
        nonfinite="ignored",
        degree=0,
    ),
    "ConstantWeighting": _wt(
        lambda m: eqxjd.ConstantWeighting(_pref(m)),
        True,
        reads="rows",
        nonfinite="ignored",
        degree=0,
    ),
    "RandomWeighting": _wt(
        lambda m: eqxjd.RandomWeighting(),
        True,
        needs_key=True,
        reads="rows",
        nonfinite="ignored",
        degree=0,
        f32_rtol=None,
    ),
    # Scalarizers.
    "scalarization.Mean": _sc(lambda m: sc.Mean(), empty="nan", nonfinite="ieee"),
    "scalarization.Sum": _sc(lambda m: sc.Sum(), nonfinite="ieee"),
    "scalarization.Constant": _sc(lambda m: sc.Constant(_pref(m)), nonfinite="ieee"),
    "scalarization.Random": _sc(
        lambda m: sc.Random(), needs_key=True, nonfinite="ieee", f32_rtol=None
    ),
    "scalarization.GeometricMean": _sc(lambda m: sc.GeometricMean(), nonfinite="ieee"),
    "scalarization.COSMOS": _sc(lambda m: sc.COSMOS(1.0, _pref(m)), nonfinite="ieee"),
    "scalarization.STCH": _sc(lambda m: sc.STCH(0.01, _pref(m)), nonfinite="ieee"),
    "scalarization.PBI": _sc(lambda m: sc.PBI(5.0, _pref(m)), nonfinite="ieee"),
    "scalarization.UW": _sc(lambda m: sc.UW(m), nonfinite="ieee"),
    "scalarization.IMTLL": _sc(lambda m: sc.IMTLL(m), nonfinite="ieee"),
    "scalarization.DWA": _sc(lambda m: sc.DWA(), nonfinite="ieee"),
    "scalarization.FAMO": _sc(lambda m: sc.FAMO(m), None, nonfinite="ieee"),
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


def is_stateful(name: str) -> bool:
    case = CASES[name]
    return isinstance(case.make(case.rows), STATEFUL_TYPES)


STATEFUL = [n for n in IDS if is_stateful(n)]
KEYED = [n for n in IDS if CASES[n].needs_key]
HOMOGENEOUS = sorted(n for n in CASES if CASES[n].degree is not None)


def public_classes():
    """`(name, class)` for every concrete public class deriving from a public base."""
    for module, prefix in ((eqxjd, ""), (sc, "scalarization.")):
        for name, obj in vars(module).items():
            if name.startswith("_") or not inspect.isclass(obj):
                continue
            if issubclass(obj, PUBLIC_BASES) and not inspect.isabstract(obj):
                if not name.startswith("Abstract"):
                    yield prefix + name, obj


# ---------------------------------------------------------------------------- inputs


def jacobian(seed: int, m: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((m, n))


def stat(case: Case, jac: np.ndarray) -> np.ndarray:
    """What `case` is called with, built in float64 NumPy from a Jacobian."""
    if case.kind == "scalarizer":
        return np.abs(jac[:, 0]) + 0.5  # positive losses
    if case.kind == "weighting" and case.reads == "gramian":
        return jac @ jac.T
    return jac


def make_input(name: str, seed: int = 0, rows: int | None = None) -> np.ndarray:
    case = CASES[name]
    m = case.rows if rows is None else rows
    return stat(case, jacobian(seed, m, case.cols))


def call(instance: Any, x: Any, state: Any, key: Any):
    """`(output, new state or None)` through the public call."""
    if isinstance(instance, sc.AbstractStatefulScalarizer):
        return instance(x, state), state
    if isinstance(instance, STATEFUL_TYPES):
        return instance(x, state, key=key)
    return instance(x, key=key), None


# Eager calls run eqxjd's internally jitted kernels, so XLA compiles once per (class,
# shape, dtype). `jit=True` runs the whole call under one outer jit.
jitted_call = eqx.filter_jit(call)


def run(instance: Any, x: Any, state: Any = None, *, init_from=None, jit=False):
    """`(output, new state or None)`, through the public call (`init` first when
    `state` is None, from `init_from` if given)."""
    if isinstance(instance, STATEFUL_TYPES) and state is None:
        state = instance.init(x if init_from is None else init_from)
    return (jitted_call if jit else call)(instance, x, state, KEY)


def step(instance: Any, x: Any, state: Any, key: Any = KEY):
    """One step of a stateful method: the call (aggregators, weightings) or `update`
    then the call (DWA, FAMO, whose call does not change the state)."""
    if isinstance(instance, sc.DWA):
        state = instance.update(state, x)
        return instance(x, state), state
    if isinstance(instance, sc.FAMO):
        state = instance.update(state, x, 0.9 * x)
        return instance(x, state), state
    return call(instance, x, state, key)
