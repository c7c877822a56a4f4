"""Gramians without the Jacobian: eqxjd.value_and_gramian,
eqxjd.per_sample_value_and_gramian and eqxjd.gramian_value_and_update.

References are computed directly with `jax.jacrev` (the full Jacobian) and
`eqxjd.aggregate` with a `GramianWeightedAggregator`.
"""

import equinox as eqx
import eqxjd
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import pytest
from jaxtyping import Array, Float, PRNGKeyArray

from .helpers import rel_err


# ------------------------------------------------------------------------- fixtures


class _SoftminWeighting(eqxjd.AbstractWeighting):
    """A non-trivial test weighting that depends on the whole Gramian."""

    def __call__(
        self, stat: Float[Array, "m m"], /, *, key: PRNGKeyArray | None = None
    ) -> Float[Array, " m"]:
        scores = stat @ jnp.ones(stat.shape[0], stat.dtype) / jnp.trace(stat)
        return jax.nn.softmax(-scores)


class _CountingWeighting(eqxjd.AbstractStatefulWeighting):
    """Stateful test weighting: w = (1 + count) / m, count += 1."""

    def init(self, stat: Float[Array, "m m"], /):
        return jnp.zeros((), stat.dtype)

    def __call__(self, stat, state, /, *, key=None):
        m = stat.shape[0]
        return jnp.full((m,), (1 + state) / m, stat.dtype), state + 1


def _upgrad_or_skip():
    try:
        weighting = eqxjd.UPGradWeighting()
        weighting(jnp.eye(2))
    except ValueError as e:  # the default solver may not be registered yet
        pytest.skip(f"UPGradWeighting unavailable: {e}")
    return weighting


def _mlp(key, out=1, dtype=jnp.float64):
    return eqx.nn.MLP(3, out, 6, 2, activation=jnp.tanh, key=key, dtype=dtype)


def _data(key, batch=7, out=1, dtype=jnp.float64):
    kx, ky = jr.split(key)
    return jr.normal(kx, (batch, 3), dtype), jr.normal(ky, (batch, out), dtype)


def _sample_loss(model, x, y):  # IWRM: one scalar per sample
    return jnp.sum((model(x) - y) ** 2)


def _task_losses(model, x, y):  # IWMTL: (T,) per sample
    return (model(x) - y) ** 2


def _batched_loss(model, xs, ys):
    return jax.vmap(_sample_loss, in_axes=(None, 0, 0))(model, xs, ys)


def _full_jacobian(fn, model, *args):
    """Reference: the Jacobian pytree of `fn(model, *args).ravel()` from jax.jacrev."""
    diff, static = eqx.partition(model, eqx.is_inexact_array)
    return jax.jacrev(lambda d: jnp.ravel(fn(eqx.combine(d, static), *args)))(diff)


# Eager calls dispatch op by op (slow): the tests call jitted versions.
_value_and_gramian = eqx.filter_jit(eqxjd.value_and_gramian)
_per_sample = eqx.filter_jit(eqxjd.per_sample_value_and_gramian)
_update = eqx.filter_jit(eqxjd.gramian_value_and_update)


# ------------------------------------------------------------------------ Gramians


def test_mlp_gramian_all_paths(getkey):
    model = _mlp(getkey())
    xs, ys = _data(getkey())
    expected = eqxjd.tree_gramian(_full_jacobian(_batched_loss, model, xs, ys))
    losses_ref = _batched_loss(model, xs, ys)
    for chunk in (None, 3):  # 3 does not divide 7: the last chunk overlaps
        losses, g = _per_sample(_sample_loss, model, xs, ys, chunk_size=chunk)
        assert g.shape == (7, 7)
        assert rel_err(g, expected) < 1e-10
        assert rel_err(losses, losses_ref) < 1e-12
        assert jnp.array_equal(g, g.T)
        losses, g = _value_and_gramian(_batched_loss, model, xs, ys, chunk_size=chunk)
        assert rel_err(g, expected) < 1e-10
        assert rel_err(losses, losses_ref) < 1e-12
        assert jnp.array_equal(g, g.T)
    _, g = _per_sample(_batched_loss, model, xs, ys, batched=True, chunk_size=2)
    assert rel_err(g, expected) < 1e-10


class _ConvNet(eqx.Module):
    conv: eqx.nn.Conv2d
    linear: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jr.split(key)
        self.conv = eqx.nn.Conv2d(1, 2, 3, key=k1, dtype=jnp.float64)
        self.linear = eqx.nn.Linear(2 * 4 * 4, 1, key=k2, dtype=jnp.float64)

    def __call__(self, x):  # x: (1, 6, 6)
        return self.linear(jnp.ravel(jax.nn.relu(self.conv(x))))[0]


def test_conv_gramian(getkey):
    model = _ConvNet(getkey())
    xs = jr.normal(getkey(), (5, 1, 6, 6), jnp.float64)
    ys = jr.normal(getkey(), (5,), jnp.float64)

    def loss(m, x, y):
        return (m(x) - y) ** 2

    def batched(m, xs, ys):
        return jax.vmap(loss, in_axes=(None, 0, 0))(m, xs, ys)

    expected = eqxjd.tree_gramian(_full_jacobian(batched, model, xs, ys))
    _, g = _per_sample(loss, model, xs, ys, chunk_size=2)
    assert rel_err(g, expected) < 1e-10
    _, g = _value_and_gramian(batched, model, xs, ys, chunk_size=2)
    assert rel_err(g, expected) < 1e-10


def _centred_losses(model, xs, ys):
    """Not batch-independent: features centred with the batch mean (BatchNorm-like)."""
    h = jax.vmap(model.layers[0])(xs)
    h = h - jnp.mean(h, axis=0, keepdims=True)
    out = jax.vmap(lambda z: model.layers[-1](jnp.tanh(z)))(h)
    return jnp.sum((out - ys) ** 2, axis=1)


def test_generic_path_not_batch_independent(getkey):
    model = eqx.nn.MLP(3, 1, 6, 1, key=getkey(), dtype=jnp.float64)
    xs, ys = _data(getkey())
    expected = eqxjd.tree_gramian(_full_jacobian(_centred_losses, model, xs, ys))
    for chunk in (None, 2):
        _, g = _value_and_gramian(_centred_losses, model, xs, ys, chunk_size=chunk)
        assert rel_err(g, expected) < 1e-10
    # The per-sample path on batches of one computes something else ...
    _, g = _per_sample(_centred_losses, model, xs, ys, batched=True)
    assert rel_err(g, expected) > 1e-3
    # ... which the optional check detects,
    with pytest.raises(eqx.EquinoxRuntimeError, match="not independent"):
        _per_sample(
            _centred_losses, model, xs, ys, batched=True, check_independence=True
        )
    # while an independent batched function passes it.
    _per_sample(
        _batched_loss, _mlp(getkey()), xs, ys, batched=True, check_independence=True
    )


def test_scalar_and_matrix_losses_generic(getkey):
    model = _mlp(getkey(), out=2)
    xs, ys = _data(getkey(), batch=3, out=2)

    def total(m, xs, ys):
        return jnp.sum(jax.vmap(_task_losses, in_axes=(None, 0, 0))(m, xs, ys))

    jac = _full_jacobian(total, model, xs, ys)
    losses, g = _value_and_gramian(total, model, xs, ys)
    assert losses.shape == () and g.shape == (1, 1)
    assert rel_err(g, eqxjd.tree_gramian(jac)) < 1e-12

    def matrix(m, xs, ys):
        return jax.vmap(_task_losses, in_axes=(None, 0, 0))(m, xs, ys)

    expected = eqxjd.tree_gramian(_full_jacobian(matrix, model, xs, ys))
    losses, g = _value_and_gramian(matrix, model, xs, ys, chunk_size=4)
    assert losses.shape == (3, 2) and g.shape == (6, 6)
    assert rel_err(g, expected) < 1e-10


# -------------------------------------------------------------------------- updates


def _check_update(out, weighting, jac, losses_ref):
    aggregator = eqxjd.GramianWeightedAggregator(weighting)
    expected = eqxjd.aggregate(aggregator, jac)
    g = eqxjd.tree_gramian(jac)
    assert rel_err(out.gramian, g) < 1e-10
    assert rel_err(out.weights.ravel(), weighting(g)) < 1e-9
    assert rel_err(out.losses, losses_ref) < 1e-12
    for a, b in zip(jtu.tree_leaves(out.updates), jtu.tree_leaves(expected)):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert rel_err(a, b) < 1e-9


def test_update_equals_autojac(getkey):
    model = _mlp(getkey())
    xs, ys = _data(getkey())
    jac = _full_jacobian(_batched_loss, model, xs, ys)
    losses_ref = _batched_loss(model, xs, ys)
    weighting = _SoftminWeighting()
    out = _update(_sample_loss, weighting, model, xs, ys, per_sample=True, chunk_size=3)
    assert out.updates.layers[0].weight.shape == model.layers[0].weight.shape
    assert out.state is None
    _check_update(out, weighting, jac, losses_ref)
    out = _update(_batched_loss, weighting, model, xs, ys, chunk_size=2)
    _check_update(out, weighting, jac, losses_ref)
    # An aggregator is accepted in place of its weighting.
    out = _update(
        _sample_loss,
        eqxjd.GramianWeightedAggregator(weighting),
        model,
        xs,
        ys,
        per_sample=True,
    )
    _check_update(out, weighting, jac, losses_ref)
    # Mean weighting: the update is the gradient of the mean loss.
    out = _update(_sample_loss, eqxjd.MeanWeighting(), model, xs, ys, per_sample=True)
    grad = eqx.filter_grad(lambda m: jnp.mean(_batched_loss(m, xs, ys)))(model)
    assert eqx.tree_equal(out.updates, grad, rtol=1e-12, atol=1e-14)


def test_update_equals_autojac_upgrad(getkey):
    weighting = _upgrad_or_skip()
    model = _mlp(getkey())
    xs, ys = _data(getkey())
    jac = _full_jacobian(_batched_loss, model, xs, ys)
    out = _update(_sample_loss, weighting, model, xs, ys, per_sample=True, chunk_size=4)
    _check_update(out, weighting, jac, _batched_loss(model, xs, ys))


def test_stateful_weighting(getkey):
    model = _mlp(getkey())
    xs, ys = _data(getkey(), batch=4)
    weighting = _CountingWeighting()
    with pytest.raises(ValueError, match="stateful"):
        _update(_sample_loss, weighting, model, xs, ys, per_sample=True)
    state = weighting.init(jnp.zeros((4, 4)))
    out = _update(_sample_loss, weighting, model, xs, ys, per_sample=True, state=state)
    out = _update(
        _sample_loss, weighting, model, xs, ys, per_sample=True, state=out.state
    )
    assert out.state == 2
    assert jnp.allclose(out.weights, 2 / 4)


# ---------------------------------------------------------------- IWMTL, partial JD


def test_iwmtl(getkey):
    model = _mlp(getkey(), out=2)
    xs, ys = _data(getkey(), batch=5, out=2)

    def batched(m, xs, ys):
        return jax.vmap(_task_losses, in_axes=(None, 0, 0))(m, xs, ys)

    jac = _full_jacobian(batched, model, xs, ys)
    weighting = _SoftminWeighting()
    out = _update(_task_losses, weighting, model, xs, ys, per_sample=True, chunk_size=2)
    assert out.losses.shape == (5, 2)
    assert out.weights.shape == (5, 2)
    assert out.gramian.shape == (10, 10)
    # weights[i, t] belongs to losses[i, t] (row-major flattening).
    assert rel_err(out.weights.ravel(), weighting(out.gramian)) < 1e-14
    _check_update(out, weighting, jac, batched(model, xs, ys))
    # The batched function gives the same Gramian.
    _, g = _per_sample(batched, model, xs, ys, batched=True, chunk_size=2)
    assert rel_err(g, out.gramian) < 1e-10


def test_partial_jd(getkey):
    model = _mlp(getkey())
    xs, ys = _data(getkey())
    last = lambda m: m.layers[-1]
    spec = jtu.tree_map(lambda _: False, model)
    spec = eqx.tree_at(last, spec, replace=jtu.tree_map(lambda _: True, last(model)))
    jac = _full_jacobian(_batched_loss, model, xs, ys)
    g_last = eqxjd.tree_gramian(last(jac))
    weighting = _SoftminWeighting()
    for chunk in (None, 3):
        out = _update(
            _sample_loss,
            weighting,
            model,
            xs,
            ys,
            per_sample=True,
            chunk_size=chunk,
            filter_spec=spec,
        )
        assert rel_err(out.gramian, g_last) < 1e-10
        _, g = _value_and_gramian(
            _batched_loss, model, xs, ys, filter_spec=spec, chunk_size=chunk
        )
        assert rel_err(g, g_last) < 1e-10
    # The update still covers every parameter: w^T J with the full Jacobian.
    expected = jtu.tree_map(lambda leaf: jnp.tensordot(out.weights, leaf, axes=1), jac)
    assert eqx.tree_equal(out.updates, expected, rtol=1e-10, atol=1e-14)
    assert jnp.any(out.updates.layers[0].weight != 0)
    # A callable filter works too.
    _, g = _per_sample(_sample_loss, model, xs, ys, filter_spec=lambda x: x.ndim == 2)
    weights_only = eqxjd.tree_gramian([layer.weight for layer in jac.layers])
    assert rel_err(g, weights_only) < 1e-10


# --------------------------------------------------------------------- jit and dtype


def test_jit_no_retrace(getkey):
    model = _mlp(getkey())
    weighting = _SoftminWeighting()

    @eqx.filter_jit
    @eqx.debug.assert_max_traces(max_traces=1)
    def step(model, xs, ys):
        return eqxjd.gramian_value_and_update(
            _sample_loss, weighting, model, xs, ys, per_sample=True, chunk_size=3
        )

    for i in range(3):
        xs, ys = _data(getkey())
        out = step(model, xs, ys)
        if i == 0:  # eager == jit (one eager call: they are slow)
            eager = eqxjd.gramian_value_and_update(
                _sample_loss, weighting, model, xs, ys, per_sample=True, chunk_size=3
            )
            assert eqx.tree_equal(out, eager, rtol=1e-12, atol=1e-14)
        model = eqx.apply_updates(model, jtu.tree_map(lambda u: -0.1 * u, out.updates))


def test_float32(getkey):
    model = _mlp(getkey(), dtype=jnp.float32)
    xs, ys = _data(getkey(), dtype=jnp.float32)
    out = _update(_sample_loss, eqxjd.MeanWeighting(), model, xs, ys, per_sample=True)
    assert out.gramian.dtype == jnp.float32
    assert out.weights.dtype == jnp.float32
    assert all(u.dtype == jnp.float32 for u in jtu.tree_leaves(out.updates))
    _, g = _value_and_gramian(_batched_loss, model, xs, ys, chunk_size=2)
    assert g.dtype == jnp.float32


# ----------------------------------------------------------------------- bad input


def test_bad_input(getkey):
    model = _mlp(getkey())
    xs, ys = _data(getkey())
    w = eqxjd.MeanWeighting()
    with pytest.raises(ValueError, match="Mismatched batch sizes"):
        eqxjd.per_sample_value_and_gramian(_sample_loss, model, xs, ys[:5])
    with pytest.raises(ValueError, match="Mismatched batch sizes"):
        eqxjd.gramian_value_and_update(
            _sample_loss, w, model, xs, ys[:5], per_sample=True
        )
    with pytest.raises(
        ValueError, match=r"scalar or a vector|\(7, T\); got \(7, 1, 1\)"
    ):
        eqxjd.per_sample_value_and_gramian(
            lambda m, x, y: jnp.outer(m(x), y), model, xs, ys
        )
    with pytest.raises(ValueError, match=r"shape \(7,\) or \(7, T\)"):
        eqxjd.per_sample_value_and_gramian(
            lambda m, xs, ys: jnp.sum(_batched_loss(m, xs, ys)),
            model,
            xs,
            ys,
            batched=True,
        )
    with pytest.raises(ValueError, match="floating"):
        eqxjd.value_and_gramian(lambda m, xs: jnp.arange(3), model, xs)
    with pytest.raises(ValueError, match="chunk_size"):
        eqxjd.value_and_gramian(_batched_loss, model, xs, ys, chunk_size=0)
    with pytest.raises(ValueError, match="filter_spec"):
        eqxjd.value_and_gramian(_batched_loss, model, xs, ys, filter_spec=False)
    with pytest.raises(ValueError, match="leading batch axis"):
        eqxjd.per_sample_value_and_gramian(_sample_loss, model, xs, jnp.ones(()))
    with pytest.raises((TypeError, ValueError)):  # jaxtyping's hook may fire first
        eqxjd.gramian_value_and_update(_sample_loss, eqxjd.Mean(), model, xs, ys)
    with pytest.raises(ValueError, match="per_sample=True"):
        eqxjd.gramian_value_and_update(
            _batched_loss, w, model, xs, ys, check_independence=True
        )
    with pytest.raises(ValueError, match="batched=True"):
        eqxjd.per_sample_value_and_gramian(
            _sample_loss, model, xs, ys, check_independence=True
        )


# ------------------------------------------- the two chunked per-sample strategies


class _LinearStack(eqx.Module):
    """Hand-written dense layers (no eqx.nn.MLP)."""

    layers: tuple[eqx.nn.Linear, ...]

    def __init__(self, key, out=1):
        k1, k2, k3 = jr.split(key, 3)
        self.layers = (
            eqx.nn.Linear(3, 5, key=k1, dtype=jnp.float64),
            eqx.nn.Linear(5, 4, use_bias=False, key=k2, dtype=jnp.float64),
            eqx.nn.Linear(4, out, key=k3, dtype=jnp.float64),
        )

    def __call__(self, x):
        for layer in self.layers[:-1]:
            x = jax.nn.softplus(layer(x))
        return self.layers[-1](x)


class _ConvLinear(eqx.Module):
    """A Linear layer feeding a small Conv2d (a non-dense parametrised layer)."""

    linear: eqx.nn.Linear
    conv: eqx.nn.Conv2d

    def __init__(self, key, out=1):
        k1, k2 = jr.split(key)
        self.linear = eqx.nn.Linear(3, 16, key=k1, dtype=jnp.float64)
        self.conv = eqx.nn.Conv2d(1, out, 4, key=k2, dtype=jnp.float64)

    def __call__(self, x):
        h = jnp.tanh(self.linear(x)).reshape(1, 4, 4)
        return jnp.ravel(self.conv(h))  # (out,)


_MODELS = {
    "mlp": lambda key, out: _mlp(key, out=out),
    "stack": _LinearStack,
    "conv": _ConvLinear,
}


@pytest.fixture(params=["forward", "pairwise"])
def strategy(request, monkeypatch):
    """Forces one chunked strategy (the choice is otherwise made from a cost
    estimate); each test jits afresh so that no trace of the other one is reused."""
    forward = request.param == "forward"
    monkeypatch.setattr(
        eqxjd._gramian.per_sample, "forward_mode_is_cheap", lambda *args: forward
    )
    return request.param


@pytest.mark.parametrize("name", sorted(_MODELS))
@pytest.mark.parametrize("tasks", [None, 2])
def test_chunked_strategies_exact(getkey, strategy, name, tasks):
    out = tasks or 1
    model = _MODELS[name](getkey(), out)
    xs, ys = _data(getkey(), batch=7, out=out)
    loss = _task_losses if tasks else _sample_loss
    batched = jax.vmap(loss, in_axes=(None, 0, 0))
    expected = eqxjd.tree_gramian(
        _full_jacobian(lambda m, x, y: batched(m, x, y), model, xs, ys)
    )
    per_sample = eqx.filter_jit(eqxjd.per_sample_value_and_gramian)
    for chunk in (2, 3, 4):  # 2 and 3 leave an overlapping last chunk; k = 2 for 4
        losses, g = per_sample(loss, model, xs, ys, chunk_size=chunk)
        assert g.shape == (7 * out, 7 * out)
        assert rel_err(g, expected) < 1e-10
        assert jnp.array_equal(g, g.T)
    _, g = per_sample(
        lambda m, x, y: batched(m, x, y), model, xs, ys, batched=True, chunk_size=3
    )
    assert rel_err(g, expected) < 1e-10


def test_chunked_strategies_partial_jd(getkey, strategy):
    model = _LinearStack(getkey())
    xs, ys = _data(getkey())
    spec = jtu.tree_map(lambda _: False, model)
    spec = eqx.tree_at(lambda m: m.layers[1].weight, spec, replace=True)
    jac = _full_jacobian(_batched_loss, model, xs, ys)
    expected = eqxjd.tree_gramian(jac.layers[1].weight)
    update = eqx.filter_jit(eqxjd.gramian_value_and_update)
    out = update(
        _sample_loss,
        _SoftminWeighting(),
        model,
        xs,
        ys,
        per_sample=True,
        chunk_size=3,
        filter_spec=spec,
    )
    assert rel_err(out.gramian, expected) < 1e-10
    full = jtu.tree_map(lambda leaf: jnp.tensordot(out.weights, leaf, axes=1), jac)
    assert eqx.tree_equal(out.updates, full, rtol=1e-10, atol=1e-14)


def test_strategy_choice(getkey):
    cheap = eqxjd._gramian.per_sample.forward_mode_is_cheap
    wide = eqx.nn.MLP(32, 1, 64, 2, key=getkey(), dtype=jnp.float64)
    xs = jr.normal(getkey(), (7, 32), jnp.float64)
    ys = jr.normal(getkey(), (7, 1), jnp.float64)
    gram, static = eqx.partition(wide, eqx.is_inexact_array)

    def vec(g, x, y):
        return jnp.reshape(_sample_loss(eqx.combine(g, static), x, y), (-1,))

    assert cheap(vec, gram, (xs, ys))  # dense layers: ~2 flops per parameter
    conv = _ConvNet(getkey())
    images = jr.normal(getkey(), (7, 1, 6, 6), jnp.float64)
    conv_gram, conv_static = eqx.partition(conv, eqx.is_inexact_array)
    conv_vec = lambda g, x: eqx.combine(g, conv_static)(x)[None]
    assert not cheap(conv_vec, conv_gram, (images,))  # weight sharing: many more

    @jax.custom_vjp
    def square(x):
        return x**2

    square.defvjp(lambda x: (x**2, x), lambda x, ct: (2 * x * ct,))

    def loss(m, x, y):
        return square(_sample_loss(m, x, y))

    # Forward mode unsupported: the pairwise strategy, still exact.
    assert not cheap(lambda g, x, y: square(vec(g, x, y)), gram, (xs, ys))
    batched = jax.vmap(loss, in_axes=(None, 0, 0))
    expected = eqxjd.tree_gramian(_full_jacobian(batched, wide, xs, ys))
    _, g = _per_sample(loss, wide, xs, ys, chunk_size=3)
    assert rel_err(g, expected) < 1e-10
