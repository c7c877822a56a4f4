"""Jacobians of loss vectors, the Jacobian-descent step with each strategy, the
multi-task step and grouped aggregation."""

from typing import ClassVar

import equinox as eqx
import eqxjd
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
import pytest

from .helpers import REFERENCE, tree_allclose


# ------------------------------------------------------------------------------------
# Test fixtures: a small model with non-trainable leaves, and test-only aggregators
# ------------------------------------------------------------------------------------


class Net(eqx.Module):
    layers: tuple[eqx.nn.Linear, eqx.nn.Linear]
    counter: jax.Array  # integer array: not trainable
    scale: float = eqx.field(static=True)

    def __init__(self, key, n_in=4, hidden=3, n_out=3):
        k1, k2 = jr.split(key)
        self.layers = (
            eqx.nn.Linear(n_in, hidden, key=k1),
            eqx.nn.Linear(hidden, n_out, key=k2),
        )
        self.counter = jnp.arange(3)
        self.scale = 2.0

    def __call__(self, x):
        return self.layers[1](jnp.tanh(self.layers[0](x))) * self.scale


def losses_fn(model, x, y):
    """One MSE per output: a loss vector of shape (n_out,)."""
    return jnp.mean((jax.vmap(model)(x) - y) ** 2, axis=0)


def losses_aux_fn(model, x, y):
    losses = losses_fn(model, x, y)
    return losses, {"total": jnp.sum(losses)}


class _EMAWeighting(eqxjd.AbstractStatefulWeighting):
    """Test-only stateful Gramian weighting: EMA of 1/diag(G) weights."""

    reads: ClassVar[str] = "gramian"
    differentiable: ClassVar[bool] = True

    def init(self, stat, /):
        m = stat.shape[0]
        return jnp.full((m,), 1 / m, stat.dtype)

    def __call__(self, stat, state, /, *, key=None):
        if state.shape != (stat.shape[0],):
            raise ValueError("state built for another m")
        target = 1 / (1 + jnp.diag(stat))
        new = 0.5 * state + 0.5 * target / jnp.sum(target)
        return new, new


class _RandomWeighting(eqxjd.AbstractWeighting):
    """Test-only random weighting (needs a key)."""

    reads: ClassVar[str] = "rows"
    differentiable: ClassVar[bool] = True

    def __call__(self, stat, /, *, key=None):
        if key is None:
            raise ValueError("this weighting needs a `key`.")
        return jr.uniform(key, (stat.shape[0],), stat.dtype)


def _first_layer_only(leaf):
    return eqx.is_array(leaf) and leaf.shape in ((3, 4), (3,))


def stateful_agg():
    return eqxjd.StatefulWeightedAggregator(_EMAWeighting())


def random_agg():
    return eqxjd.WeightedAggregator(_RandomWeighting())


def _upgrad_works() -> bool:
    try:
        eqxjd.UPGrad()(jnp.eye(2))
        return True
    except Exception:
        return False


UPGRAD_OK = _upgrad_works()
needs_upgrad = pytest.mark.skipif(not UPGRAD_OK, reason="UPGrad's solver is missing")


@pytest.fixture(scope="module")
def setup():
    key = jr.key(0)
    k1, k2, k3 = jr.split(key, 3)
    model = Net(k1)
    x = jr.normal(k2, (8, 4))
    y = jr.normal(k3, (8, 3))
    return model, x, y


@eqx.filter_jit
def explicit_jacobian(model, x, y):
    """jax.jacrev on the partitioned model."""
    diff, static = eqx.partition(model, eqx.is_inexact_array)
    return jax.jacrev(lambda d: losses_fn(eqx.combine(d, static), x, y))(diff)


def as_matrix(jac):
    leaves = jtu.tree_leaves(jac)
    m = leaves[0].shape[0]
    return jnp.concatenate([leaf.reshape(m, -1) for leaf in leaves], axis=1)


def unflatten_like(vec, jac):
    leaves, treedef = jtu.tree_flatten(jac)
    out, start = [], 0
    for leaf in leaves:
        size = leaf[0].size
        out.append(vec[start : start + size].reshape(leaf.shape[1:]))
        start += size
    return jtu.tree_unflatten(treedef, out)


# ------------------------------------------------------------------------------------
# Jacobians
# ------------------------------------------------------------------------------------


def test_jacobian_equals_jacrev(setup):
    model, x, y = setup
    value, jac = eqxjd.filter_value_and_jac(losses_fn)(model, x, y)
    assert value.shape == (3,)
    assert tree_allclose(value, losses_fn(model, x, y))
    expected = explicit_jacobian(model, x, y)
    assert tree_allclose(jac, expected, rtol=1e-12, atol=1e-14)
    # Structure of the model; non-trainable leaves are None.
    assert jac.counter is None
    assert jac.scale == 2.0
    assert jac.layers[0].weight.shape == (3, 3, 4)
    assert tree_allclose(eqxjd.filter_jac(losses_fn)(model, x, y), jac)


def test_jacobian_has_aux(setup):
    model, x, y = setup
    (losses, aux), jac = eqxjd.filter_value_and_jac(losses_aux_fn, has_aux=True)(
        model, x, y
    )
    jac2, aux2 = eqxjd.filter_jac(losses_aux_fn, has_aux=True)(model, x, y)
    assert tree_allclose(aux["total"], jnp.sum(losses))
    assert tree_allclose(aux2, aux)
    assert tree_allclose(jac, explicit_jacobian(model, x, y), rtol=1e-12, atol=1e-14)
    assert tree_allclose(jac2, jac)


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 10])
def test_chunked_equals_unchunked(setup, chunk_size):
    model, x, y = setup
    full = eqxjd.filter_jac(losses_fn)(model, x, y)
    chunked = eqxjd.filter_jac(losses_fn, chunk_size=chunk_size)(model, x, y)
    assert tree_allclose(chunked, full, rtol=1e-13, atol=1e-15)


def test_documented_examples():
    # TorchJD 0.18.0 autojac docstring: p = [1, 2], y1 = [-1, 1] . p, y2 = sum(p^2).
    p = jnp.array([1.0, 2.0])
    jac = eqxjd.filter_jac(lambda p: jnp.stack([jnp.array([-1.0, 1.0]) @ p, p @ p]))(p)
    assert tree_allclose(jac, jnp.array([[-1.0, 1.0], [2.0, 4.0]]))
    # The Gramian of the Jacobian w.r.t. (W, b): sum of per-leaf Gramians.
    params = {"W": jnp.array([[1.0, 2.0], [3.0, 4.0]]), "b": jnp.array([0.5, -0.5])}

    def fn(params):
        y1 = params["W"] @ jnp.array([1.0, -1.0]) + params["b"]
        y2 = jnp.sum(params["W"] ** 2) + jnp.sum(params["b"] ** 2)
        return jnp.concatenate([y1, y2[None]])

    gram = eqxjd.tree_gramian(eqxjd.filter_jac(fn)(params))
    expected = jnp.array([[3.0, 0.0, -1.0], [0.0, 3.0, -3.0], [-1.0, -3.0, 122.0]])
    assert tree_allclose(gram, expected, rtol=1e-12)
    # Chain rule: x = [1, 2], h = x^2, y1 = sum(h), y2 = [1, -1] . h.
    x = jnp.array([1.0, 2.0])
    jac = eqxjd.filter_jac(
        lambda x: jnp.stack([jnp.sum(x**2), jnp.array([1.0, -1.0]) @ x**2])
    )(x)
    assert tree_allclose(jac, jnp.array([[2.0, 4.0], [2.0, -4.0]]))


@needs_upgrad
def test_documented_upgrad_example():
    p = jnp.array([1.0, 2.0])
    fn = lambda p: jnp.stack([jnp.array([-1.0, 1.0]) @ p, p @ p])
    out = eqxjd.aggregate(eqxjd.UPGrad(), eqxjd.filter_jac(fn)(p))
    assert tree_allclose(out.update, jnp.array([0.5, 2.5]), rtol=1e-7)
    assert tree_allclose(out.weights, jnp.array([0.5, 0.5]), rtol=1e-7)


def test_float32(setup):
    model, x, y = setup
    model32 = jtu.tree_map(
        lambda a: a.astype(jnp.float32) if eqx.is_inexact_array(a) else a, model
    )
    jac = eqxjd.filter_jac(losses_fn)(
        model32, x.astype(jnp.float32), y.astype(jnp.float32)
    )
    assert all(leaf.dtype == jnp.float32 for leaf in jtu.tree_leaves(jac))
    out = eqxjd.filter_value_and_aggregate(losses_fn, eqxjd.Mean())(
        model32, x.astype(jnp.float32), y.astype(jnp.float32)
    )
    assert all(leaf.dtype == jnp.float32 for leaf in jtu.tree_leaves(out.update))


# ------------------------------------------------------------------------------------
# Aggregated updates
# ------------------------------------------------------------------------------------


def _aggregators():
    aggs = [eqxjd.Mean(), eqxjd.Sum(), eqxjd.Constant(jnp.array([0.2, 0.3, 0.5]))]
    if UPGRAD_OK:
        aggs.append(eqxjd.UPGrad())
    return aggs


@pytest.mark.parametrize("aggregator", _aggregators(), ids=lambda a: type(a).__name__)
def test_update_equals_aggregating_explicit_jacobian(setup, aggregator):
    model, x, y = setup
    step = eqxjd.filter_value_and_aggregate(losses_fn, aggregator)
    out = step(model, x, y)
    losses, update, weights = out.losses, out.update, out.weights
    assert out.state is None and out.aux is None
    jac = explicit_jacobian(model, x, y)
    matrix = as_matrix(jac)
    expected = unflatten_like(aggregator(matrix), jac)
    assert tree_allclose(update, expected, rtol=1e-10, atol=1e-13)
    assert tree_allclose(weights, aggregator.weights(matrix), rtol=1e-10, atol=1e-13)
    assert tree_allclose(losses, losses_fn(model, x, y))
    # Same through eqxjd.aggregate on the Jacobian pytree.
    out2 = eqxjd.aggregate(aggregator, jac)
    assert tree_allclose(out2.update, expected, rtol=1e-10, atol=1e-13)
    assert tree_allclose(out2.weights, weights, rtol=1e-10, atol=1e-13)


def test_update_applies_and_leaves_non_trainable_untouched(setup):
    model, x, y = setup
    step = eqxjd.filter_value_and_aggregate(losses_fn, eqxjd.Mean())
    out = step(model, x, y)
    losses, update = out.losses, out.update
    assert update.counter is None and update.scale == 2.0
    new = eqx.apply_updates(model, jtu.tree_map(lambda u: -0.1 * u, update))
    assert new.counter is model.counter and new.scale == model.scale
    # Mean aggregation = gradient of the mean loss.
    grads = eqx.filter_grad(lambda m: jnp.mean(losses_fn(m, x, y)))(model)
    assert tree_allclose(update, grads, rtol=1e-12, atol=1e-14)
    assert jnp.mean(losses_fn(new, x, y)) < jnp.mean(losses)


def test_has_aux_and_kwargs(setup):
    model, x, y = setup

    def fn(model, x, *, y):
        return losses_aux_fn(model, x, y)

    step = eqxjd.filter_value_and_aggregate(fn, eqxjd.Mean(), has_aux=True)
    out = step(model, x, y=y)
    assert tree_allclose(out.aux["total"], jnp.sum(out.losses))


def test_stateful_and_no_retrace(setup):
    model, x, y = setup
    agg = stateful_agg()
    step = eqxjd.filter_value_and_aggregate(losses_fn, agg)
    state = step.init(model, x, y)
    assert state.shape == (3,)

    @eqx.filter_jit
    @eqx.debug.assert_max_traces(max_traces=1)
    def train_step(model, state, x, y):
        out = step(model, x, y, agg_state=state)
        model = eqx.apply_updates(model, jtu.tree_map(lambda u: -0.1 * u, out.update))
        return model, out.state, out.losses, out.weights

    # Reference: explicit loop over the same aggregator on explicit Jacobians.
    ref_model, ref_state = model, agg.init(as_matrix(explicit_jacobian(model, x, y)))
    for _ in range(3):
        model, state, losses, weights = train_step(model, state, x, y)
        jac = explicit_jacobian(ref_model, x, y)
        d, ref_state = agg(as_matrix(jac), ref_state)
        ref_model = eqx.apply_updates(
            ref_model, jtu.tree_map(lambda u: -0.1 * u, unflatten_like(d, jac))
        )
        assert tree_allclose(weights, ref_state, rtol=1e-10)
    assert tree_allclose(state, ref_state, rtol=1e-10)
    assert tree_allclose(model, ref_model, rtol=1e-10, atol=1e-13)


def test_random_aggregator(setup):
    model, x, y = setup
    step = eqxjd.filter_value_and_aggregate(losses_fn, random_agg())
    o1 = eqx.filter_jit(step)(model, x, y, agg_key=jr.key(1))
    o2 = step(model, x, y, agg_key=jr.key(1))
    o3 = step(model, x, y, agg_key=jr.key(2))
    assert tree_allclose(o1.update, o2.update) and tree_allclose(o1.weights, o2.weights)
    assert not jnp.allclose(o1.weights, o3.weights)
    with pytest.raises((TypeError, ValueError), match="key"):
        step(model, x, y)


# ------------------------------------------------------------------------------------
# Multi-task helper
# ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mtl_setup():
    keys = jr.split(jr.key(3), 6)
    trunk = eqx.nn.MLP(5, 4, 6, 1, key=keys[0])
    heads = (
        eqx.nn.Linear(4, 1, key=keys[1]),
        eqx.nn.Linear(4, 1, key=keys[2]),
        eqx.nn.MLP(4, 1, 3, 1, key=keys[3]),
    )
    x = jr.normal(keys[4], (10, 5))
    y = jr.normal(keys[5], (10, 3))
    return trunk, heads, x, y


def mtl_features(trunk, x, y):
    return jax.vmap(trunk)(x)


def mtl_losses(heads, features, x, y):
    preds = [jax.vmap(h)(features)[:, 0] for h in heads]
    return jnp.stack([jnp.mean((p - y[:, i]) ** 2) for i, p in enumerate(preds)])


@eqx.filter_jit
def per_task_gradients(trunk, heads, x, y):
    """Each loss differentiated separately: (grad wrt trunk, grad wrt own head)."""
    out = []
    for i in range(len(heads)):

        def loss_i(trunk, head):
            hs = heads[:i] + (head,) + heads[i + 1 :]
            return mtl_losses(hs, mtl_features(trunk, x, y), x, y)[i]

        out.append(eqx.filter_grad(lambda th: loss_i(*th))((trunk, heads[i])))
    return out


@pytest.fixture(scope="module")
def per_task(mtl_setup):
    return per_task_gradients(*mtl_setup)


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_mtl_equals_per_loss_gradients(mtl_setup, per_task, chunk_size):
    trunk, heads, x, y = mtl_setup
    fn = eqxjd.filter_mtl_value_and_jac(mtl_features, mtl_losses, chunk_size=chunk_size)
    losses, (shared_jac, heads_grad) = eqx.filter_jit(fn)(trunk, heads, x, y)
    assert losses.shape == (3,)
    for i, (g_trunk, g_head) in enumerate(per_task):
        row = jtu.tree_map(lambda leaf: leaf[i], shared_jac)
        assert tree_allclose(row, g_trunk, rtol=1e-11, atol=1e-14)
        assert tree_allclose(heads_grad[i], g_head, rtol=1e-11, atol=1e-14)


def test_mtl_aggregate(mtl_setup):
    trunk, heads, x, y = mtl_setup
    agg = eqxjd.Constant(jnp.array([0.5, 0.2, 0.3]))
    step = eqxjd.filter_mtl_value_and_aggregate(mtl_features, mtl_losses, agg)
    out = eqx.filter_jit(step)(trunk, heads, x, y)
    (trunk_update, heads_update), weights = out.update, out.weights
    _, (shared_jac, heads_grad) = eqxjd.filter_mtl_value_and_jac(
        mtl_features, mtl_losses
    )(trunk, heads, x, y)
    expected = unflatten_like(agg(as_matrix(shared_jac)), shared_jac)
    assert tree_allclose(trunk_update, expected, rtol=1e-11, atol=1e-14)
    assert tree_allclose(heads_update, heads_grad, rtol=1e-11, atol=1e-14)
    assert tree_allclose(weights, jnp.array([0.5, 0.2, 0.3]))


def test_mtl_stateful_pytree_features_and_aux(mtl_setup):
    trunk, heads, x, y = mtl_setup

    def features_fn(trunk, x, y):
        f = jax.vmap(trunk)(x)
        return {"a": f, "b": f[:, :2]}

    def losses_fn(heads, features, x, y):
        losses = mtl_losses(heads, features["a"], x, y)
        losses = losses + jnp.mean(features["b"] ** 2) * jnp.array([1.0, 0.0, 0.0])
        return losses, jnp.sum(losses)

    agg = stateful_agg()
    step = eqxjd.filter_mtl_value_and_aggregate(
        features_fn, losses_fn, agg, has_aux=True
    )
    state = step.init(trunk, heads, x, y)
    out = step(trunk, heads, x, y, agg_state=state)
    (tu, _), state2 = out.update, out.state
    assert tree_allclose(out.aux, jnp.sum(out.losses))
    jac_fn = eqxjd.filter_mtl_value_and_jac(features_fn, losses_fn, has_aux=True)
    _, (shared_jac, _) = jac_fn(trunk, heads, x, y)
    d, expected_state = agg(as_matrix(shared_jac), state)
    assert tree_allclose(tu, unflatten_like(d, shared_jac), rtol=1e-11, atol=1e-14)
    assert tree_allclose(state2, expected_state)
    # The full Jacobian equals jacrev through trunk and heads.
    diff, static = eqx.partition(trunk, eqx.is_inexact_array)
    full = jax.jacrev(
        lambda d: losses_fn(heads, features_fn(eqx.combine(d, static), x, y), x, y)[0]
    )(diff)
    assert tree_allclose(shared_jac, full, rtol=1e-11, atol=1e-14)


# ------------------------------------------------------------------------------------
# Grouping
# ------------------------------------------------------------------------------------


def test_grouping_matches_separate_aggregations(setup):
    model, x, y = setup
    jac = explicit_jacobian(model, x, y)
    agg0, agg1 = eqxjd.Constant(jnp.array([1.0, 2.0, 3.0])), eqxjd.Mean()
    grouped = eqxjd.Grouped(
        (lambda m: m.layers[0], agg0), (lambda m: m.layers[1], agg1)
    )
    out = eqxjd.aggregate(grouped, jac)
    update, weights = out.update, out.weights
    for layer, agg in zip(range(2), (agg0, agg1)):
        sub = jac.layers[layer]
        expected = unflatten_like(agg(as_matrix(sub)), sub)
        assert tree_allclose(update.layers[layer], expected, rtol=1e-12)
    assert tree_allclose(weights[0], jnp.array([1.0, 2.0, 3.0]))
    assert tree_allclose(weights[1], jnp.full((3,), 1 / 3))
    assert update.counter is None
    # A filter specification (pytree prefix of bools) selects the same groups.
    spec0 = jtu.tree_map(lambda _: False, jac)
    spec0 = eqx.tree_at(lambda m: m.layers[0], spec0, replace=True)
    spec1 = eqx.tree_at(lambda m: m.layers[1], jtu.tree_map(lambda _: False, jac), True)
    grouped2 = eqxjd.Grouped((spec0, agg0), (spec1, agg1))
    assert tree_allclose(eqxjd.aggregate(grouped2, jac).update, update)
    # Per-tensor grouping with a tuple of nodes and the step transformation.
    grouped3 = eqxjd.Grouped(
        (lambda m: (m.layers[0].weight, m.layers[1].weight), agg0),
        (lambda m: (m.layers[0].bias, m.layers[1].bias), agg1),
    )
    step = eqxjd.filter_value_and_aggregate(losses_fn, grouped3)
    out3 = step(model, x, y)
    update3, weights3 = out3.update, out3.weights
    sub = (jac.layers[0].weight, jac.layers[1].weight)
    expected = unflatten_like(agg0(as_matrix(sub)), sub)
    assert tree_allclose(update3.layers[1].weight, expected[1], rtol=1e-12)
    assert len(weights3) == 2


def test_grouping_stateful_random(setup):
    model, x, y = setup
    grouped = eqxjd.Grouped(
        (lambda m: m.layers[0], stateful_agg()), (lambda m: m.layers[1], random_agg())
    )
    step = eqxjd.filter_value_and_aggregate(losses_fn, grouped)
    state = step.init(model, x, y)
    assert state[1] is None and state[0].shape == (3,)
    o1 = step(model, x, y, agg_state=state, agg_key=jr.key(0))
    o2 = step(model, x, y, agg_state=state, agg_key=jr.key(0))
    assert tree_allclose(o1.update, o2.update) and tree_allclose(o1.state, o2.state)
    with pytest.raises(ValueError, match="stateful"):
        step(model, x, y, agg_key=jr.key(0))


def test_grouping_errors(setup):
    model, x, y = setup
    jac = explicit_jacobian(model, x, y)
    mean = eqxjd.Mean()
    overlap = eqxjd.Grouped((lambda m: m.layers, mean), (lambda m: m.layers[0], mean))
    with pytest.raises(ValueError, match="disjoint"):
        eqxjd.aggregate(overlap, jac)
    missing = eqxjd.Grouped((lambda m: m.layers[0], mean))
    with pytest.raises(ValueError, match="no group"):
        eqxjd.aggregate(missing, jac)
    wrong = eqxjd.Grouped((lambda m: m.missing_attribute, mean))
    with pytest.raises(ValueError, match="where"):
        eqxjd.aggregate(wrong, jac)
    with pytest.raises(ValueError):
        eqxjd.Grouped()
    with pytest.raises((TypeError, ValueError)):
        eqxjd.Grouped((lambda m: m, "upgrad"))  # pyright: ignore[reportArgumentType]


# ------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------


def test_bad_inputs(setup):
    model, x, y = setup
    mean = eqxjd.Mean()
    scalar = lambda m, x, y: jnp.sum(losses_fn(m, x, y))
    matrix = lambda m, x, y: (jax.vmap(m)(x) - y) ** 2
    integer = lambda m, x, y: jnp.arange(3)
    with pytest.raises(ValueError, match="scalar"):
        eqxjd.filter_value_and_aggregate(scalar, mean)(model, x, y)
    # Losses of any shape: one row per entry, in the order of `losses.ravel()`.
    rows = eqxjd.filter_jac(matrix)(model, x, y).layers[0].weight
    assert rows.shape == (x.shape[0] * 3, 3, 4)
    with pytest.raises(ValueError, match="floating"):
        eqxjd.filter_jac(integer)(model, x, y)
    with pytest.raises(ValueError, match="2-tuple"):
        eqxjd.filter_jac(losses_fn, has_aux=True)(model, x, y)
    for chunk_size in (0, -1, 1.5, True):
        with pytest.raises((TypeError, ValueError)):
            eqxjd.filter_jac(losses_fn, chunk_size=chunk_size)  # pyright: ignore
    with pytest.raises((TypeError, ValueError)):
        eqxjd.filter_value_and_aggregate(losses_fn, "upgrad")  # pyright: ignore
    # A stateful aggregator without its state; a stateless one with a state.
    with pytest.raises(ValueError, match="stateful"):
        eqxjd.filter_value_and_aggregate(losses_fn, stateful_agg())(model, x, y)
    with pytest.raises(ValueError, match="stateless"):
        eqxjd.filter_value_and_aggregate(losses_fn, mean)(model, x, y, agg_state=1)
    # A state built for another number of objectives.
    agg = stateful_agg()
    with pytest.raises(ValueError):
        eqxjd.filter_value_and_aggregate(losses_fn, agg)(
            model, x, y, agg_state=jnp.ones(5)
        )
    # Partial Jacobian descent needs weights for the other leaves.
    partial = eqxjd.filter_value_and_aggregate(
        losses_fn, eqxjd.TrimmedMean(trim_number=0), filter_spec=_first_layer_only
    )
    with pytest.raises(ValueError, match="weights"):
        partial(model, x, y)
    # Gramian strategies need a weighting that reads the Gramian.
    for strategy in (eqxjd.Gramian(), eqxjd.PerSampleGramian()):
        with pytest.raises(ValueError, match="Gramian"):
            eqxjd.filter_value_and_aggregate(
                losses_fn, eqxjd.ConFIG(), strategy=strategy
            )(model, x, y)
    with pytest.raises((TypeError, ValueError)):  # jaxtyping's hook may fire first
        eqxjd.filter_value_and_aggregate(losses_fn, mean, strategy="gramian")  # pyright: ignore
    # Jacobian pytrees with mismatched m, or no leaves.
    bad = {"a": jnp.zeros((2, 3)), "b": jnp.zeros((3, 3))}
    with pytest.raises(ValueError, match="leading"):
        eqxjd.aggregate(mean, bad)
    with pytest.raises(ValueError):
        eqxjd.aggregate(mean, {})
    with pytest.raises(ValueError, match="stateful"):
        eqxjd.aggregate(stateful_agg(), {"a": jnp.zeros((2, 3))})
    # MTL: features that are not floating arrays.
    with pytest.raises(ValueError, match="floating"):
        eqxjd.filter_mtl_value_and_jac(lambda t, x: jnp.arange(3), lambda h, f, x: f)(
            model, model, x
        )


# ------------------------------------------------------------------------------------
# Reference trajectory from TorchJD (seed example), if the fixture exists
# ------------------------------------------------------------------------------------


HAS_REFERENCE = (REFERENCE / "autojac.npz").exists()
needs_reference = pytest.mark.skipif(not HAS_REFERENCE, reason="no autojac.npz")


@pytest.fixture(scope="module")
def reference():
    from .helpers import load_reference

    return load_reference("autojac")


def _linear(weight, bias):
    layer = eqx.nn.Linear(weight.shape[1], weight.shape[0], key=jr.key(0))
    return eqx.tree_at(lambda l: (l.weight, l.bias), layer, (weight, bias))


def _ref_params(data, prefix, names):
    return [jnp.asarray(data[f"{prefix}/{n}"]) for n in names]


def _sgd(tree, update, lr=0.1):
    return eqx.apply_updates(tree, jtu.tree_map(lambda u: -lr * u, update))


@needs_upgrad
@needs_reference
def test_seed_example_matches_torchjd_trajectory(reference):
    """TorchJD 0.18.0: 100 steps of backward + aggregate(UPGrad) + SGD(0.1)."""
    data = reference
    names = ("0.weight", "0.bias", "2.weight", "2.bias")
    w1, b1, w2, b2 = _ref_params(data, "basic/init", names)
    model = eqx.nn.Sequential(
        [_linear(w1, b1), eqx.nn.Lambda(jax.nn.relu), _linear(w2, b2)]
    )
    x, y = jnp.asarray(data["basic/x"]), jnp.asarray(data["basic/y"])

    def fn(model, x, y):
        return jnp.mean((jax.vmap(model)(x) - y) ** 2, axis=0)

    value_and_jac = eqxjd.filter_value_and_jac(fn)
    step_fn = eqxjd.filter_value_and_aggregate(fn, eqxjd.UPGrad())
    # Step 0: the Jacobian and the aggregated gradient.
    _, jac = value_and_jac(model, x, y)
    jac_leaves = [jac.layers[0].weight, jac.layers[0].bias, jac.layers[2].weight]
    jac_leaves.append(jac.layers[2].bias)
    for name, leaf in zip(names, jac_leaves):
        np.testing.assert_allclose(leaf, data[f"basic/step0/jac/{name}"], rtol=1e-12)

    @eqx.filter_jit
    @eqx.debug.assert_max_traces(max_traces=1)
    def step(model):
        out = step_fn(model, x, y)
        return _sgd(model, out.update), out.losses, out.weights, out.update

    losses, weights = [], []
    for i in range(100):
        model, l, w, update = step(model)
        if i == 0:
            grads = [update.layers[0].weight, update.layers[0].bias]
            grads += [update.layers[2].weight, update.layers[2].bias]
            for name, g in zip(names, grads):
                ref = data[f"basic/step0/grad/{name}"]
                np.testing.assert_allclose(g, ref, rtol=1e-9, atol=1e-12)
        losses.append(l)
        weights.append(w)
    losses, weights = np.asarray(jnp.stack(losses)), np.asarray(jnp.stack(weights))
    assert np.max(np.abs(losses - data["basic/losses"])) < 1e-9
    assert np.max(np.abs(weights - data["basic/weights"])) < 1e-7
    final = [model.layers[0].weight, model.layers[0].bias]
    final += [model.layers[2].weight, model.layers[2].bias]
    for name, p in zip(names, final):
        np.testing.assert_allclose(
            p, data[f"basic/final/{name}"], rtol=1e-8, atol=1e-10
        )


@needs_upgrad
@needs_reference
def test_mtl_matches_torchjd_trajectory(reference):
    """TorchJD 0.18.0: 20 steps of mtl_backward + aggregate(UPGrad) + SGD(0.1)."""
    data = reference
    tw, tb, h1w, h1b, h2w, h2b = _ref_params(
        data,
        "mtl/init",
        (
            "trunk.0.weight",
            "trunk.0.bias",
            "head1.weight",
            "head1.bias",
            "head2.weight",
            "head2.bias",
        ),
    )
    trunk = _linear(tw, tb)
    heads = (_linear(h1w, h1b), _linear(h2w, h2b))
    x, y = jnp.asarray(data["mtl/x"]), jnp.asarray(data["mtl/y"])

    def features_fn(trunk, x, y):
        return jax.nn.relu(jax.vmap(trunk)(x))

    def losses_fn(heads, features, x, y):
        p1 = jax.vmap(heads[0])(features)[:, 0]
        p2 = jax.vmap(heads[1])(features)[:, 0]
        return jnp.stack([jnp.mean((p1 - y[:, 0]) ** 2), jnp.mean((p2 - y[:, 1]) ** 2)])

    step_fn = eqxjd.filter_mtl_value_and_aggregate(
        features_fn, losses_fn, eqxjd.UPGrad()
    )

    @eqx.filter_jit
    @eqx.debug.assert_max_traces(max_traces=1)
    def step(trunk, heads):
        out = step_fn(trunk, heads, x, y)
        tu, hu = out.update
        return _sgd(trunk, tu), _sgd(heads, hu), out.losses, out.weights, (tu, hu)

    losses, weights = [], []
    for i in range(20):
        trunk, heads, l, w, (tu, hu) = step(trunk, heads)
        if i == 0:
            got = [
                tu.weight,
                tu.bias,
                hu[0].weight,
                hu[0].bias,
                hu[1].weight,
                hu[1].bias,
            ]
            names = ["trunk.0.weight", "trunk.0.bias", "head1.weight", "head1.bias"]
            names += ["head2.weight", "head2.bias"]
            for name, g in zip(names, got):
                ref = data[f"mtl/step0/grad/{name}"]
                np.testing.assert_allclose(g, ref, rtol=1e-9, atol=1e-12)
        losses.append(l)
        weights.append(w)
    assert np.max(np.abs(np.asarray(jnp.stack(losses)) - data["mtl/losses"])) < 1e-9
    assert np.max(np.abs(np.asarray(jnp.stack(weights)) - data["mtl/weights"])) < 1e-7
    np.testing.assert_allclose(
        trunk.weight, data["mtl/final/trunk.0.weight"], rtol=1e-8
    )
    np.testing.assert_allclose(heads[1].bias, data["mtl/final/head2.bias"], rtol=1e-8)


@needs_reference
def test_documented_examples_reference(reference):
    data = reference
    p = jnp.asarray(data["doc1/p"])
    jac = eqxjd.filter_jac(lambda p: jnp.stack([jnp.array([-1.0, 1.0]) @ p, p @ p]))(p)
    np.testing.assert_allclose(jac, data["doc1/jac"], rtol=1e-14)
    if UPGRAD_OK:
        out = eqxjd.aggregate(eqxjd.UPGrad(), jac)
        np.testing.assert_allclose(out.update, data["doc1/grad"], rtol=1e-9)
        np.testing.assert_allclose(out.weights, data["doc1/weights"], rtol=1e-9)
    params = {"W": jnp.asarray(data["doc2/W"]), "b": jnp.asarray(data["doc2/b"])}

    def fn(params):
        y1 = params["W"] @ jnp.array([1.0, -1.0]) + params["b"]
        y2 = jnp.sum(params["W"] ** 2) + jnp.sum(params["b"] ** 2)
        return jnp.concatenate([y1, y2[None]])

    jac = eqxjd.filter_jac(fn)(params)
    np.testing.assert_allclose(jac["W"], data["doc2/jac_W"], rtol=1e-14)
    np.testing.assert_allclose(jac["b"], data["doc2/jac_b"], rtol=1e-14)
    np.testing.assert_allclose(
        eqxjd.tree_gramian(jac), data["doc2/gramian"], rtol=1e-14
    )
    x = jnp.asarray(data["doc3/x"])
    h = lambda x: x**2
    _, jac_h = jax.vjp(h, x)
    # Chain rule (TorchJD's `jac(..., jac_outputs=...)`): d[y1, y2]/dh pulled back.
    dy_dh = eqxjd.filter_jac(
        lambda h: jnp.stack([jnp.sum(h), jnp.array([1.0, -1.0]) @ h])
    )(h(x))
    chained = jax.vmap(lambda row: jac_h(row)[0])(dy_dh)
    np.testing.assert_allclose(chained, data["doc3/jac"], rtol=1e-14)
