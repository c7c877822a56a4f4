"""The strategies of a Jacobian-descent step: Gramians without the Jacobian
(`eqxjd.Gramian`, `eqxjd.PerSampleGramian`) against the full Jacobian from
`jax.jacrev`, and the updates they give against `eqxjd.aggregate`."""

from typing import ClassVar

import equinox as eqx
import eqxjd
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import pytest
from eqxjd._gramian import per_sample as per_sample_kernels
from jaxtyping import Array, Float, PRNGKeyArray

from .helpers import rel_err


class _SoftminWeighting(eqxjd.AbstractWeighting):
    """A non-trivial test weighting that depends on the whole Gramian."""

    reads: ClassVar[str] = "gramian"
    differentiable: ClassVar[bool] = True

    def __call__(
        self, stat: Float[Array, "m m"], /, *, key: PRNGKeyArray | None = None
    ) -> Float[Array, " m"]:
        scores = stat @ jnp.ones(stat.shape[0], stat.dtype) / jnp.trace(stat)
        return jax.nn.softmax(-scores)


class _CountingWeighting(eqxjd.AbstractStatefulWeighting):
    """Stateful test weighting: w = (1 + count) / m, count += 1."""

    reads: ClassVar[str] = "gramian"
    differentiable: ClassVar[bool] = True

    def init(self, stat: Float[Array, "m m"], /):
        return jnp.zeros((), stat.dtype)

    def __call__(self, stat, state, /, *, key=None):
        m = stat.shape[0]
        return jnp.full((m,), (1 + state) / m, stat.dtype), state + 1


SOFTMIN = eqxjd.WeightedAggregator(_SoftminWeighting())


def _mlp(key, out=1, dtype=jnp.float64):
    return eqx.nn.MLP(3, out, 6, 2, activation=jnp.tanh, key=key, dtype=dtype)


def _data(key, batch=7, out=1, dtype=jnp.float64):
    kx, ky = jr.split(key)
    return jr.normal(kx, (batch, 3), dtype), jr.normal(ky, (batch, out), dtype)


def per_sample_losses(model, xs, ys):  # IWRM: one loss per sample, shape (B,)
    return jnp.sum((jax.vmap(model)(xs) - ys) ** 2, axis=1)


def task_losses(model, xs, ys):  # IWMTL: (B, T)
    return (jax.vmap(model)(xs) - ys) ** 2


def _full_jacobian(fn, model, *args):
    """Reference: the Jacobian pytree of `fn(model, *args).ravel()` from jax.jacrev."""
    diff, static = eqx.partition(model, eqx.is_inexact_array)
    return jax.jacrev(lambda d: jnp.ravel(fn(eqx.combine(d, static), *args)))(diff)


STRATEGIES = {
    "full": eqxjd.FullJacobian(),
    "full-chunked": eqxjd.FullJacobian(chunk_size=3),
    "gramian": eqxjd.Gramian(),
    "gramian-chunked": eqxjd.Gramian(chunk_size=3),
    "per-sample": eqxjd.PerSampleGramian(),
    # 3 does not divide 7: the last chunk overlaps the previous one.
    "per-sample-chunked": eqxjd.PerSampleGramian(chunk_size=3),
    "per-sample-gradients": eqxjd.PerSampleGramian(method="gradients"),
    "per-sample-gradients-chunked": eqxjd.PerSampleGramian(
        chunk_size=3, method="gradients"
    ),
}


def _gramian_fn(fn, strategy, **kwargs):
    return eqx.filter_jit(
        eqxjd.filter_value_and_gramian(fn, strategy=strategy, **kwargs)
    )


def _step(fn, aggregator, strategy, **kwargs):
    step = eqxjd.filter_value_and_aggregate(fn, aggregator, strategy=strategy, **kwargs)
    return eqx.filter_jit(step)


# ------------------------------------------------------------------------ Gramians


@pytest.mark.parametrize("name", sorted(STRATEGIES))
@pytest.mark.parametrize("fn", [per_sample_losses, task_losses], ids=["iwrm", "iwmtl"])
def test_gramian_equals_jacobian_gramian(getkey, name, fn):
    out = 2 if fn is task_losses else 1
    model = _mlp(getkey(), out=out)
    xs, ys = _data(getkey(), out=out)
    expected = eqxjd.tree_gramian(_full_jacobian(fn, model, xs, ys))
    losses, g = _gramian_fn(fn, STRATEGIES[name])(model, xs, ys)
    assert g.shape == (7 * out, 7 * out)
    assert rel_err(g, expected) < 1e-10
    assert rel_err(losses, fn(model, xs, ys)) < 1e-12
    assert jnp.array_equal(g, g.T)


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

    def losses(m, xs, ys):
        return (jax.vmap(m)(xs) - ys) ** 2

    expected = eqxjd.tree_gramian(_full_jacobian(losses, model, xs, ys))
    for strategy in (
        eqxjd.PerSampleGramian(chunk_size=2),
        eqxjd.PerSampleGramian(chunk_size=2, method="gradients"),
        eqxjd.Gramian(2),
    ):
        _, g = _gramian_fn(losses, strategy)(model, xs, ys)
        assert rel_err(g, expected) < 1e-10


def _centred_losses(model, xs, ys):
    """Not batch-independent: features centred with the batch mean (BatchNorm-like)."""
    h = jax.vmap(model.layers[0])(xs)
    h = h - jnp.mean(h, axis=0, keepdims=True)
    out = jax.vmap(lambda z: model.layers[-1](jnp.tanh(z)))(h)
    return jnp.sum((out - ys) ** 2, axis=1)


def test_per_sample_needs_independent_samples(getkey):
    model = eqx.nn.MLP(3, 1, 6, 1, key=getkey(), dtype=jnp.float64)
    xs, ys = _data(getkey())
    expected = eqxjd.tree_gramian(_full_jacobian(_centred_losses, model, xs, ys))
    for chunk in (None, 2):
        _, g = _gramian_fn(_centred_losses, eqxjd.Gramian(chunk))(model, xs, ys)
        assert rel_err(g, expected) < 1e-10
    # The per-sample strategy on batches of one computes something else ...
    _, g = _gramian_fn(_centred_losses, eqxjd.PerSampleGramian())(model, xs, ys)
    assert rel_err(g, expected) > 1e-3
    # ... which the optional check detects,
    for method in ("structured", "gradients"):
        checked = eqxjd.PerSampleGramian(check_independence=True, method=method)
        with pytest.raises(eqx.EquinoxRuntimeError, match="not independent"):
            _gramian_fn(_centred_losses, checked)(model, xs, ys)
        # while an independent function passes it.
        _gramian_fn(per_sample_losses, checked)(_mlp(getkey()), xs, ys)


def test_scalar_losses_are_rejected_and_matrices_flattened(getkey):
    model = _mlp(getkey(), out=2)
    xs, ys = _data(getkey(), batch=3, out=2)
    with pytest.raises(ValueError, match="scalar"):
        _gramian_fn(lambda m, x, y: jnp.sum(task_losses(m, x, y)), eqxjd.Gramian())(
            model, xs, ys
        )
    expected = eqxjd.tree_gramian(_full_jacobian(task_losses, model, xs, ys))
    losses, g = _gramian_fn(task_losses, eqxjd.Gramian(chunk_size=4))(model, xs, ys)
    assert losses.shape == (3, 2) and g.shape == (6, 6)
    assert rel_err(g, expected) < 1e-10


# -------------------------------------------------------------------------- updates


def _check_update(out, aggregator, jac, losses_ref):
    expected = eqxjd.aggregate(aggregator, jac)
    assert rel_err(out.weights.ravel(), expected.weights) < 1e-9
    assert out.weights.shape == losses_ref.shape
    assert rel_err(out.losses, losses_ref) < 1e-12
    for a, b in zip(jtu.tree_leaves(out.update), jtu.tree_leaves(expected.update)):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert rel_err(a, b) < 1e-9


@pytest.mark.parametrize("name", sorted(STRATEGIES))
@pytest.mark.parametrize("fn", [per_sample_losses, task_losses], ids=["iwrm", "iwmtl"])
def test_update_equals_aggregating_the_jacobian(getkey, name, fn):
    out = 2 if fn is task_losses else 1
    model = _mlp(getkey(), out=out)
    xs, ys = _data(getkey(), batch=5, out=out)
    jac = _full_jacobian(fn, model, xs, ys)
    result = _step(fn, SOFTMIN, STRATEGIES[name])(model, xs, ys)
    assert result.state is None and result.aux is None
    assert result.update.layers[0].weight.shape == model.layers[0].weight.shape
    _check_update(result, SOFTMIN, jac, fn(model, xs, ys))


@pytest.mark.parametrize("name", ["gramian", "per-sample-chunked"])
def test_upgrad_and_mean(getkey, name):
    model = _mlp(getkey())
    xs, ys = _data(getkey())
    jac = _full_jacobian(per_sample_losses, model, xs, ys)
    upgrad = eqxjd.UPGrad()
    out = _step(per_sample_losses, upgrad, STRATEGIES[name])(model, xs, ys)
    _check_update(out, upgrad, jac, per_sample_losses(model, xs, ys))
    # Mean: the update is the gradient of the mean loss.
    out = _step(per_sample_losses, eqxjd.Mean(), STRATEGIES[name])(model, xs, ys)
    grad = eqx.filter_grad(lambda m: jnp.mean(per_sample_losses(m, xs, ys)))(model)
    assert eqx.tree_equal(out.update, grad, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", ["gramian", "per-sample"])
def test_stateful_weighting(getkey, name):
    model = _mlp(getkey())
    xs, ys = _data(getkey(), batch=4)
    aggregator = eqxjd.StatefulWeightedAggregator(_CountingWeighting())
    step = eqxjd.filter_value_and_aggregate(
        per_sample_losses, aggregator, strategy=STRATEGIES[name]
    )
    with pytest.raises(ValueError, match="stateful"):
        step(model, xs, ys)
    state = step.init(model, xs, ys)
    assert state == 0
    out = step(model, xs, ys, agg_state=state)
    out = step(model, xs, ys, agg_state=out.state)
    assert out.state == 2
    assert jnp.allclose(out.weights, 2 / 4)


@pytest.mark.parametrize("name", ["full", "gramian", "per-sample-chunked"])
def test_partial_jacobian_descent(getkey, name):
    model = _mlp(getkey())
    xs, ys = _data(getkey())
    last = lambda m: m.layers[-1]
    spec = jtu.tree_map(lambda _: False, model)
    spec = eqx.tree_at(last, spec, replace=jtu.tree_map(lambda _: True, last(model)))
    jac = _full_jacobian(per_sample_losses, model, xs, ys)
    g_last = eqxjd.tree_gramian(last(jac))
    strategy = STRATEGIES[name]
    _, g = _gramian_fn(per_sample_losses, strategy, filter_spec=spec)(model, xs, ys)
    assert rel_err(g, g_last) < 1e-10
    out = _step(per_sample_losses, SOFTMIN, strategy, filter_spec=spec)(model, xs, ys)
    assert rel_err(out.weights, _SoftminWeighting()(g_last)) < 1e-10
    # The update covers every parameter: w^T J with the full Jacobian.
    expected = jtu.tree_map(lambda leaf: jnp.tensordot(out.weights, leaf, axes=1), jac)
    assert eqx.tree_equal(out.update, expected, rtol=1e-10, atol=1e-14)
    assert jnp.any(out.update.layers[0].weight != 0)
    # A callable filter works too.
    weights_only = lambda x: x.ndim == 2
    _, g = _gramian_fn(per_sample_losses, strategy, filter_spec=weights_only)(
        model, xs, ys
    )
    assert rel_err(g, eqxjd.tree_gramian([lay.weight for lay in jac.layers])) < 1e-10


# --------------------------------------------------------------------- jit and dtype


def test_jit_no_retrace_and_eager(getkey):
    model = _mlp(getkey())
    step = eqxjd.filter_value_and_aggregate(
        per_sample_losses, SOFTMIN, strategy=eqxjd.PerSampleGramian(chunk_size=3)
    )

    @eqx.filter_jit
    @eqx.debug.assert_max_traces(max_traces=1)
    def train(model, xs, ys):
        return step(model, xs, ys)

    for i in range(3):
        xs, ys = _data(getkey())
        out = train(model, xs, ys)
        if i == 0:  # eager == jit (one eager call: they are slow)
            assert eqx.tree_equal(out, step(model, xs, ys), rtol=1e-12, atol=1e-14)
        model = eqx.apply_updates(model, jtu.tree_map(lambda u: -0.1 * u, out.update))


@pytest.mark.parametrize("name", ["gramian-chunked", "per-sample"])
def test_float32(getkey, name):
    model = _mlp(getkey(), dtype=jnp.float32)
    xs, ys = _data(getkey(), dtype=jnp.float32)
    out = _step(per_sample_losses, eqxjd.Mean(), STRATEGIES[name])(model, xs, ys)
    assert out.weights.dtype == jnp.float32
    assert all(u.dtype == jnp.float32 for u in jtu.tree_leaves(out.update))
    _, g = _gramian_fn(per_sample_losses, STRATEGIES[name])(model, xs, ys)
    assert g.dtype == jnp.float32


def test_has_aux(getkey):
    model = _mlp(getkey())
    xs, ys = _data(getkey())

    def with_aux(model, xs, ys):
        losses = per_sample_losses(model, xs, ys)
        return losses, {"mean": jnp.mean(losses)}

    for strategy in (
        eqxjd.Gramian(),
        eqxjd.PerSampleGramian(),
        eqxjd.PerSampleGramian(method="gradients"),
    ):
        out = _step(with_aux, SOFTMIN, strategy, has_aux=True)(model, xs, ys)
        assert rel_err(out.aux["mean"], jnp.mean(out.losses)) < 1e-14
        (losses, aux), _ = _gramian_fn(with_aux, strategy, has_aux=True)(model, xs, ys)
        assert rel_err(aux["mean"], jnp.mean(losses)) < 1e-14


# ----------------------------------------------------------------------- bad input


def test_bad_input(getkey):
    model = _mlp(getkey())
    xs, ys = _data(getkey())
    per_sample = eqxjd.PerSampleGramian()
    gramian = eqxjd.filter_value_and_gramian
    with pytest.raises(ValueError, match="Mismatched batch sizes"):
        gramian(per_sample_losses, strategy=per_sample)(model, xs, ys[:5])
    with pytest.raises(ValueError, match=r"shape \(7,\) or \(7, T\)"):
        gramian(lambda m, x, y: task_losses(m, x, y)[..., None], strategy=per_sample)(
            model, xs, ys
        )
    with pytest.raises(ValueError, match="floating"):
        gramian(lambda m, xs: jnp.arange(3))(model, xs)
    with pytest.raises(ValueError, match="chunk_size"):
        eqxjd.Gramian(chunk_size=0)
    with pytest.raises((TypeError, ValueError), match="method"):
        eqxjd.PerSampleGramian(method="ghost")  # pyright: ignore[reportArgumentType]
    with pytest.raises(ValueError, match="filter_spec"):
        gramian(per_sample_losses, filter_spec=False)(model, xs, ys)
    with pytest.raises(ValueError, match="leading batch axis"):
        gramian(per_sample_losses, strategy=per_sample)(model, xs, jnp.ones(()))
    with pytest.raises((TypeError, ValueError)):  # jaxtyping's hook may fire first
        gramian(per_sample_losses, strategy=eqxjd.UPGrad())  # pyright: ignore


# ------------------------------------------- the two chunked per-sample kernels


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
def kernel(request, monkeypatch):
    """Forces one chunked kernel (the choice is otherwise made from a cost
    estimate); each test jits afresh so that no trace of the other one is reused."""
    forward = request.param == "forward"
    monkeypatch.setattr(
        per_sample_kernels, "forward_mode_is_cheap", lambda *args: forward
    )
    return request.param


@pytest.mark.parametrize("name", sorted(_MODELS))
@pytest.mark.parametrize("tasks", [None, 2])
def test_chunked_kernels_exact(getkey, kernel, name, tasks):
    out = tasks or 1
    model = _MODELS[name](getkey(), out)
    xs, ys = _data(getkey(), batch=7, out=out)
    fn = task_losses if tasks else per_sample_losses
    expected = eqxjd.tree_gramian(_full_jacobian(fn, model, xs, ys))
    for chunk in (2, 3, 4):  # 2 and 3 leave an overlapping last chunk; k = 2 for 4
        strategy = eqxjd.PerSampleGramian(chunk_size=chunk, method="gradients")
        _, g = _gramian_fn(fn, strategy)(model, xs, ys)
        assert g.shape == (7 * out, 7 * out)
        assert rel_err(g, expected) < 1e-10
        assert jnp.array_equal(g, g.T)


def test_kernel_choice(getkey):
    cheap = per_sample_kernels.forward_mode_is_cheap
    wide = eqx.nn.MLP(32, 1, 64, 2, key=getkey(), dtype=jnp.float64)
    xs = jr.normal(getkey(), (7, 32), jnp.float64)
    ys = jr.normal(getkey(), (7, 1), jnp.float64)
    gram, static = eqx.partition(wide, eqx.is_inexact_array)

    def vec(g, x, y):
        return jnp.reshape(jnp.sum((eqx.combine(g, static)(x) - y) ** 2), (-1,))

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

    def losses(m, xs, ys):
        return square(per_sample_losses(m, xs, ys))

    # Forward mode unsupported: the pairwise kernel, still exact.
    assert not cheap(lambda g, x, y: square(vec(g, x, y)), gram, (xs, ys))
    expected = eqxjd.tree_gramian(_full_jacobian(losses, wide, xs, ys))
    strategy = eqxjd.PerSampleGramian(chunk_size=3, method="gradients")
    _, g = _gramian_fn(losses, strategy)(wide, xs, ys)
    assert rel_err(g, expected) < 1e-10
