"""The optax adapter: `eqxjd.as_optax`."""

import equinox as eqx
import eqxjd
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import pytest

from .helpers import tree_allclose
from .test_step import losses_fn, Net, random_agg, stateful_agg


optax = pytest.importorskip("optax")


@pytest.fixture(scope="module")
def setup():
    k1, k2, k3 = jr.split(jr.key(5), 3)
    return Net(k1), jr.normal(k2, (8, 4)), jr.normal(k3, (8, 3))


def params_of(model):
    return eqx.filter(model, eqx.is_inexact_array)


def test_chain_step_equals_manual_step(setup):
    model, x, y = setup
    agg = eqxjd.Constant(jnp.array([0.5, 1.0, 2.0]))
    jac_fn = eqx.filter_jit(eqxjd.filter_jac(losses_fn))
    with jax.numpy_dtype_promotion("standard"):
        optim = optax.chain(eqxjd.as_optax(agg), optax.adam(1e-2))
        opt_state = optim.init(params_of(model))
        adam = optax.adam(1e-2)
        adam_state = adam.init(params_of(model))
        ref = model
        for _ in range(3):
            jac = jac_fn(model, x, y)
            updates, opt_state = optim.update(jac, opt_state, params_of(model))
            model = eqx.apply_updates(model, updates)
            # Manual: aggregate, then adam.
            ref_update = eqxjd.aggregate(agg, jac_fn(ref, x, y)).update
            ref_updates, adam_state = adam.update(
                ref_update, adam_state, params_of(ref)
            )
            ref = eqx.apply_updates(ref, ref_updates)
    assert tree_allclose(model, ref, rtol=1e-12, atol=1e-14)
    assert model.counter is ref.counter


def test_sgd_step_and_jit_no_retrace(setup):
    model, x, y = setup
    agg = eqxjd.Mean()
    with jax.numpy_dtype_promotion("standard"):
        optim = optax.chain(eqxjd.as_optax(agg), optax.sgd(0.1))
        opt_state = optim.init(params_of(model))

    @eqx.filter_jit
    @eqx.debug.assert_max_traces(max_traces=1)
    def step(model, opt_state, x, y):
        losses, jac = eqxjd.filter_value_and_jac(losses_fn)(model, x, y)
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = optim.update(jac, opt_state, params_of(model))
        return eqx.apply_updates(model, updates), opt_state, losses

    ref = model
    history = []
    for _ in range(4):
        model, opt_state, losses = step(model, opt_state, x, y)
        history.append(losses)
        grads = eqx.filter_grad(lambda m: jnp.mean(losses_fn(m, x, y)))(ref)
        ref = eqx.apply_updates(ref, jtu.tree_map(lambda g: -0.1 * g, grads))
    assert tree_allclose(model, ref, rtol=1e-12, atol=1e-14)
    assert jnp.sum(history[-1]) < jnp.sum(history[0])


def test_stateful_state_lives_in_optax_state(setup):
    model, x, y = setup
    agg = stateful_agg()
    with pytest.raises(ValueError, match="m="):
        eqxjd.as_optax(agg)
    with jax.numpy_dtype_promotion("standard"):
        optim = optax.chain(eqxjd.as_optax(agg, m=3), optax.sgd(0.1))
        opt_state = optim.init(params_of(model))
        assert isinstance(opt_state[0], eqxjd.AsOptaxState)
        assert opt_state[0].aggregator_state.shape == (3,)
        jac_fn = eqx.filter_jit(eqxjd.filter_jac(losses_fn))
        manual_state = agg.init(jnp.zeros((3, 5)))
        for _ in range(3):
            jac = jac_fn(model, x, y)
            updates, opt_state = optim.update(jac, opt_state, params_of(model))
            out = eqxjd.aggregate(agg, jac, manual_state)
            expected, manual_state = out.update, out.state
            assert tree_allclose(
                updates, jtu.tree_map(lambda u: -0.1 * u, expected), rtol=1e-12
            )
            model = eqx.apply_updates(model, updates)
    assert tree_allclose(opt_state[0].aggregator_state, manual_state)


def test_random_key_in_state(setup):
    model, x, y = setup
    jac = eqxjd.filter_jac(losses_fn)(model, x, y)
    transform = eqxjd.as_optax(random_agg(), key=jr.key(3))
    state = transform.init(params_of(model))
    u1, state1 = transform.update(jac, state, params_of(model))
    u1_again, _ = transform.update(jac, state, params_of(model))
    u2, _ = transform.update(jac, state1, params_of(model))
    assert tree_allclose(u1, u1_again)
    assert not tree_allclose(u1, u2)
    no_key = eqxjd.as_optax(random_agg())
    with pytest.raises(ValueError, match="key="):
        no_key.update(jac, no_key.init(params_of(model)))


def test_grouped(setup):
    model, x, y = setup
    grouped = eqxjd.Grouped(
        (lambda m: m.layers[0], eqxjd.Mean()), (lambda m: m.layers[1], eqxjd.Sum())
    )
    jac = eqxjd.filter_jac(losses_fn)(model, x, y)
    transform = eqxjd.as_optax(grouped)
    update, _ = transform.update(
        jac, transform.init(params_of(model)), params_of(model)
    )
    expected = eqxjd.aggregate(grouped, jac).update
    assert tree_allclose(update, expected)


def test_bad_inputs(setup):
    model, x, y = setup
    transform = eqxjd.as_optax(eqxjd.Mean())
    state = transform.init(params_of(model))
    jac = eqxjd.filter_jac(losses_fn)(model, x, y)
    grads = eqx.filter_grad(lambda m: jnp.sum(losses_fn(m, x, y)))(model)
    with pytest.raises(ValueError, match="shape"):  # gradients instead of Jacobians
        transform.update(grads, state, params_of(model))
    with pytest.raises(ValueError, match="structure"):
        transform.update(jac, state, {"w": jnp.zeros(3)})
    with pytest.raises(ValueError, match="structure"):
        transform.update(jac.layers, state, params_of(model))
    with pytest.raises(ValueError):
        eqxjd.as_optax(eqxjd.Mean(), m=0)
    with pytest.raises((TypeError, ValueError)):
        eqxjd.as_optax("mean")  # pyright: ignore
