"""Properties shared by every public aggregator, weighting and scalarizer, each tested
once over the registry of tests/registry.py: output shape and dtype, jit equal to eager
without retracing, vmap equal to a loop, float32 close to float64, gradients, one and
zero objectives, keys and state.

Shapes are fixed per entry (`Case.rows`, `Case.cols`), so that XLA compiles each method
once per dtype and transformation.
"""

from typing import Any

import equinox as eqx
import eqxjd
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from eqxjd import scalarization as sc

from .helpers import DTYPES, finite_difference_jvp, FLOAT, requires_x64
from .registry import (
    call,
    CASES,
    IDS,
    is_stateful,
    jacobian,
    KEY,
    KEYED,
    make_input,
    public_classes,
    run,
    stat,
    STATEFUL,
    STATEFUL_TYPES,
    step,
)


def _output_shape(name: str, m: int) -> tuple[int, ...]:
    case = CASES[name]
    return {"aggregator": (case.cols,), "weighting": (m,), "scalarizer": ()}[case.kind]


def _close(x, y, rtol, err_msg=""):
    """`x == y` up to `rtol` relative to the largest entry of `y`."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    scale = max(float(np.max(np.abs(y), initial=0.0)), 1e-300)
    np.testing.assert_allclose(x, y, rtol=rtol, atol=rtol * scale, err_msg=err_msg)


def _rtol(name: str, dtype) -> float:
    case = CASES[name]
    return case.rtol if jnp.dtype(dtype) == jnp.float64 else case.rtol32


# --------------------------------------------------------------------------- registry


def test_every_public_class_is_in_the_registry():
    covered = {type(case.make(case.rows)) for case in CASES.values()}
    missing = [name for name, cls in public_classes() if cls not in covered]
    assert not missing, f"add an entry to tests/registry.py: {missing}"


@pytest.mark.parametrize("name", IDS)
def test_declarations_match_the_class(name):
    case = CASES[name]
    instance = case.make(case.rows)
    base = {
        "aggregator": (eqxjd.AbstractAggregator, eqxjd.AbstractStatefulAggregator),
        "weighting": (eqxjd.AbstractWeighting, eqxjd.AbstractStatefulWeighting),
        "scalarizer": (sc.AbstractScalarizer, sc.AbstractStatefulScalarizer),
    }[case.kind]
    assert isinstance(instance, base)
    weighting = getattr(instance, "weighting", instance)
    if case.kind != "scalarizer" and hasattr(weighting, "differentiable"):
        assert bool(weighting.differentiable) is case.differentiable


# ------------------------------------------------------------- shape, dtype, jit


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", IDS)
def test_shape_dtype_and_jit_without_retracing(name, dtype):
    """Output of the right shape and the input dtype; jit equal to eager; a second
    jitted call with new values (and a new key and state) does not retrace."""
    case = CASES[name]
    instance = case.make(case.rows)
    traced = eqx.filter_jit(eqx.debug.assert_max_traces(call, max_traces=1))
    state = None
    for seed, key in ((0, KEY), (1, jr.key(1))):
        x = jnp.asarray(make_input(name, seed), dtype)
        if isinstance(instance, STATEFUL_TYPES):
            state = instance.init(x) if state is None else state
        eager, new_state = call(instance, x, state, key)
        assert eager.shape == _output_shape(name, case.rows)
        assert eager.dtype == dtype
        assert np.all(np.isfinite(np.asarray(eager)))
        jitted, jitted_state = traced(instance, x, state, key)
        assert jitted.dtype == dtype
        _close(jitted, eager, _rtol(name, dtype), name)
        if state is not None:
            assert jax.tree.structure(jitted_state) == jax.tree.structure(state)
            state = jitted_state


@requires_x64
@pytest.mark.parametrize("name", [n for n in IDS if CASES[n].f32_rtol is not None])
def test_float32_close_to_float64(name):
    case = CASES[name]
    instance = case.make(case.rows)
    x = make_input(name)
    out64, _ = run(instance, jnp.asarray(x, jnp.float64))
    out32, _ = run(instance, jnp.asarray(x, jnp.float32))
    assert case.f32_rtol is not None
    _close(out32, out64, case.f32_rtol, name)


# ------------------------------------------------------------------------- vmap


def _batch(name: str) -> np.ndarray:
    """Two random inputs and three degenerate ones: a zero, a rank-one and a
    duplicate-rows Jacobian (scalarizers: five positive loss vectors)."""
    case = CASES[name]
    m, n = case.rows, case.cols
    if case.kind == "scalarizer":
        return np.stack([make_input(name, seed) for seed in range(5)])
    rng = np.random.default_rng(2)
    jacobians = [
        jacobian(0, m, n),
        jacobian(1, m, n),
        np.zeros((m, n)),
        np.outer(rng.standard_normal(m), rng.standard_normal(n)),
        np.tile(rng.standard_normal(n), (m, 1)),
    ]
    return np.stack([stat(case, j) for j in jacobians])


@pytest.mark.parametrize("name", IDS)
def test_vmap_equals_a_loop(name):
    """`eqx.filter_vmap` over a batch (with a batch of states and of keys) equals a
    Python loop of eager calls; degenerate inputs give finite output, and a zero
    Jacobian a zero update."""
    case = CASES[name]
    instance = case.make(case.rows)
    batch = jnp.asarray(_batch(name), FLOAT)
    keys = jr.split(KEY, len(batch))
    if isinstance(instance, STATEFUL_TYPES):
        states = eqx.filter_vmap(instance.init)(batch)
    else:
        states = None
    vmapped, _ = eqx.filter_jit(eqx.filter_vmap(call, in_axes=(None, 0, 0, 0)))(
        instance, batch, states, keys
    )
    for i in case.vmap_lanes:
        x, key = batch[i], keys[i]
        state = None if states is None else jax.tree.map(lambda s: s[i], states)
        looped, _ = call_one(instance, x, state, key)
        _close(vmapped[i], looped, _rtol(name, FLOAT), f"{name}, lane {i}")
    assert np.all(np.isfinite(np.asarray(vmapped)))
    if case.kind == "aggregator":
        np.testing.assert_array_equal(vmapped[2], np.zeros(case.cols))


def call_one(instance: Any, x, state, key):
    if isinstance(instance, STATEFUL_TYPES) and state is None:
        state = instance.init(x)
    return call(instance, x, state, key)


# -------------------------------------------------------------------- gradients


@requires_x64
@pytest.mark.parametrize("name", IDS)
def test_gradients(name):
    """Differentiable methods: forward mode matches central finite differences and
    reverse mode matches forward mode (float64). The others: exactly zero gradients."""
    case = CASES[name]
    instance = case.make(case.rows)
    x = jnp.asarray(make_input(name), jnp.float64)
    state = instance.init(x) if isinstance(instance, STATEFUL_TYPES) else None
    rng = np.random.default_rng(3)
    tangent = rng.standard_normal(x.shape)
    if case.kind == "weighting" and case.reads == "gramian":
        tangent = tangent + tangent.T  # stay symmetric
    tangent = jnp.asarray(tangent)
    out_shape = _output_shape(name, case.rows)
    cot = jnp.asarray(rng.standard_normal(out_shape))

    def fn(x):
        return call(instance, x, state, KEY)[0]

    def loss(x):
        return jnp.sum(fn(x) * cot)

    grad = jax.grad(loss)(x)
    assert np.all(np.isfinite(np.asarray(grad)))
    if case.differentiable is None:
        return
    if not case.differentiable:
        np.testing.assert_array_equal(grad, np.zeros(x.shape))
        _, tangent_out = eqx.filter_jvp(fn, (x,), (tangent,))
        assert tangent_out is None or not bool(jnp.any(tangent_out))
        return
    _, jvp = eqx.filter_jvp(fn, (x,), (tangent,))
    if jvp is None:  # a symbolic zero: weights that only read the number of rows
        jvp = jnp.zeros(out_shape, x.dtype)
    fd = finite_difference_jvp(fn, (x,), (tangent,), eps=1e-6)
    _close(jvp, fd, case.fd_rtol, name)
    if case.kind != "weighting":  # some weights are locally constant (Krum, Mean)
        assert float(jnp.max(jnp.abs(jvp))) > 0
    np.testing.assert_allclose(
        jnp.sum(grad * tangent), jnp.sum(jvp * cot), rtol=1e-8, atol=1e-10
    )


# ------------------------------------------------------------ degenerate inputs


@pytest.mark.parametrize("name", IDS)
def test_one_objective(name):
    """m = 1: methods that need more rows raise `ValueError`; aggregators otherwise
    return a non-negative multiple of the single row."""
    case = CASES[name]
    x = jnp.asarray(make_input(name, rows=1), FLOAT)
    if case.min_rows > 1:
        with pytest.raises(ValueError):
            run(case.make(1), x)
        return
    out, _ = run(case.make(1), x)
    assert out.shape == _output_shape(name, 1)
    assert np.all(np.isfinite(np.asarray(out)))
    if case.kind == "aggregator":
        row, d = np.asarray(x[0]), np.asarray(out)
        c = float(d @ row) / float(row @ row)
        assert c >= 0
        np.testing.assert_allclose(d, c * row, rtol=1e-5, atol=1e-6 * abs(c))


@pytest.mark.parametrize("name", IDS)
def test_zero_objectives(name):
    """m = 0: `zeros(n)` (weightings: `(0,)`, scalarizers: `0`), NaN for the mean of
    no losses, or `ValueError` where the method needs rows."""
    case = CASES[name]
    x = make_input(name, rows=0) if case.kind != "scalarizer" else np.zeros((0,))
    if case.kind == "weighting" and case.reads == "gramian":
        x = np.zeros((0, 0))
    x = jnp.asarray(x, jnp.float32)
    if case.empty == "error":
        with pytest.raises(ValueError):
            run(case.make(0), x)
        return
    out, _ = run(case.make(0), x)
    assert out.shape == _output_shape(name, 0) and out.dtype == jnp.float32
    if case.empty == "nan":
        assert bool(jnp.isnan(out))
    else:
        np.testing.assert_array_equal(out, np.zeros(out.shape))


@pytest.mark.parametrize("name", [n for n in IDS if CASES[n].kind == "aggregator"])
def test_zero_columns(name):
    case = CASES[name]
    x = jnp.zeros((case.rows, 0), FLOAT)
    out, _ = run(case.make(case.rows), x)
    assert out.shape == (0,) and out.dtype == FLOAT


# ---------------------------------------------------------------------------- keys


@pytest.mark.parametrize("name", IDS)
def test_key_rules(name):
    """Random methods require `key=` and are deterministic given it; different keys
    give different outputs. The others give the same output with or without a key."""
    case = CASES[name]
    instance = case.make(case.rows)
    x = jnp.asarray(make_input(name), FLOAT)
    state = instance.init(x) if is_stateful(name) else None
    if isinstance(instance, sc.AbstractStatefulScalarizer):
        return  # no `key` argument
    out, _ = call(instance, x, state, KEY)
    if not case.needs_key:
        np.testing.assert_array_equal(call(instance, x, state, None)[0], out)
        return
    with pytest.raises(ValueError, match="key"):
        call(instance, x, state, None)
    np.testing.assert_array_equal(call(instance, x, state, KEY)[0], out)
    others = [call(instance, x, state, jr.key(k))[0] for k in range(1, 5)]
    assert any(not np.array_equal(o, out) for o in others)


def test_keyed_entries_are_the_random_methods():
    assert KEYED == sorted(
        [
            "GradDrop",
            "GradVac",
            "GradVacWeighting",
            "PCGrad",
            "PCGradWeighting",
            "Random",
            "RandomWeighting",
            "scalarization.Random",
        ]
    )


# --------------------------------------------------------------------------- state


@pytest.mark.parametrize("name", STATEFUL)
def test_state_rules(name):
    """`init` then a step returns a new state of the same structure and dtypes; the
    same state and input give the same output and state; a state built for another
    number of objectives is rejected."""
    case = CASES[name]
    instance = case.make(case.rows)
    x0, x1 = (jnp.asarray(make_input(name, seed), FLOAT) for seed in (0, 1))
    state0 = instance.init(x0)
    out, state1 = step(instance, x0, state0)
    _, state2 = step(instance, x1, state1)
    for state in (state1, state2):
        assert jax.tree.structure(state) == jax.tree.structure(state0)
        assert [s.dtype for s in jax.tree.leaves(state)] == [
            s.dtype for s in jax.tree.leaves(state0)
        ]
    assert eqx.tree_equal(state2, state0) is not True  # the state moves
    again, state1_again = step(instance, x0, state0)
    np.testing.assert_array_equal(again, out)
    assert eqx.tree_equal(state1_again, state1)
    wrong = jnp.asarray(make_input(name, rows=case.rows + 1), FLOAT)
    with pytest.raises(ValueError):
        step(instance, wrong, state0)
