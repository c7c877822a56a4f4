"""Multi-device checks for tests/test_sharding.py, run in a subprocess.

`XLA_FLAGS=--xla_force_host_platform_device_count=8` must be set before JAX starts,
which a pytest process that already imported JAX cannot do: this script sets it, runs
every check on an 8-device CPU mesh and prints one JSON object
`{check name: max relative error vs one device}` on its last line.
"""

import os


os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
)

import json
import sys
import time


_T0 = time.perf_counter()

from typing import ClassVar

import equinox as eqx
import jax


jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")

import eqxjd
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
from jax._src.dispatch import BACKEND_COMPILE_EVENT
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P


_COMPILES = [0]


def _count_compiles(event, duration_secs, **kwargs):
    if event == BACKEND_COMPILE_EVENT:
        _COMPILES[0] += 1


jax.monitoring.register_event_duration_secs_listener(_count_compiles)


def _log(msg):
    print(f"{time.perf_counter() - _T0:.1f}s {msg}", file=sys.stderr)


def _rel(x, y) -> float:
    errors = []
    for a, b in zip(jtu.tree_leaves(x), jtu.tree_leaves(y)):
        a, b = np.asarray(a), np.asarray(b)
        assert a.shape == b.shape, (a.shape, b.shape)
        scale = max(float(np.max(np.abs(b), initial=0.0)), 1e-300)
        errors.append(float(np.max(np.abs(a - b), initial=0.0)) / scale)
    return max(errors)


class _SoftminWeighting(eqxjd.AbstractWeighting):
    reads: ClassVar[str] = "gramian"
    differentiable: ClassVar[bool] = True

    def __call__(self, stat, /, *, key=None):
        scores = stat @ jnp.ones(stat.shape[0], stat.dtype) / jnp.trace(stat)
        return jax.nn.softmax(-scores)


def _aggregators():
    # A weighting that reads the Gramian, and UPGrad, whose solver makes batched
    # LAPACK calls that, run by every device at once, used to deadlock XLA's CPU
    # thread pool.
    return {
        "softmin": eqxjd.WeightedAggregator(_SoftminWeighting()),
        "upgrad": eqxjd.UPGrad(),
    }


def _sample_losses(model, xs, ys):
    return jnp.sum((jax.vmap(model)(xs) - ys) ** 2, axis=1)


def _task_losses(model, xs, ys):
    return (jax.vmap(model)(xs) - ys) ** 2


def _step(fn, aggregator, strategy, filter_spec=True):
    return eqx.filter_jit(
        eqxjd.filter_value_and_aggregate(
            fn, aggregator, strategy=strategy, filter_spec=filter_spec
        )
    )


def main() -> dict[str, float]:
    assert jax.device_count() == 8, jax.devices()
    results = {}
    mesh = jax.make_mesh((8,), ("data",))
    key = jr.PRNGKey(0)
    k1, k2, k3, k4 = jr.split(key, 4)
    model = eqx.nn.MLP(4, 2, 16, 2, activation=jnp.tanh, key=k1, dtype=jnp.float64)
    xs = jr.normal(k2, (16, 4), jnp.float64)
    ys = jr.normal(k3, (16, 2), jnp.float64)
    spec = jtu.tree_map(lambda _: False, model)
    spec = eqx.tree_at(
        lambda m: m.layers[-1],
        spec,
        replace=jtu.tree_map(lambda _: True, model.layers[-1]),
    )

    # 1. Data parallel (batch split over devices), explicit shard_map ring version.
    aggregators = _aggregators()
    data_parallel = eqxjd.DataParallel(mesh, "data")
    # UPGrad's lane QPs are split over the devices (32 lanes here, 16 on the 2-D mesh
    # below); partial Jacobian descent does not depend on the weighting.
    # The structured Gramian (default) and per-sample gradients (`method`).
    gradients = eqxjd.DataParallel(mesh, "data", method="gradients")
    cases = [
        ("iwrm", _sample_losses, "softmin", True, data_parallel),
        ("iwrm_gradients", _sample_losses, "softmin", True, gradients),
        ("iwmtl", _task_losses, "softmin", True, data_parallel),
        ("iwmtl", _task_losses, "upgrad", True, data_parallel),
        ("iwmtl_gradients", _task_losses, "upgrad", True, gradients),
        ("iwrm_partial", _sample_losses, "softmin", spec, data_parallel),
    ]
    for tag, loss, name, filt, strategy in cases:
        aggregator = aggregators[name]
        per_sample = eqxjd.PerSampleGramian(method="gradients")
        single = _step(loss, aggregator, per_sample, filt)(model, xs, ys)
        multi = _step(loss, aggregator, strategy, filt)(model, xs, ys)
        results[f"data_parallel/{tag}/{name}"] = _rel(multi, single)
        _log(f"{tag}/{name}")
    # Inputs already placed on the mesh stay sharded.
    shard = NamedSharding(mesh, P("data"))
    softmin = aggregators["softmin"]
    multi = _step(_sample_losses, softmin, data_parallel)(
        model, jax.device_put(xs, shard), jax.device_put(ys, shard)
    )
    assert multi.losses.sharding.spec[0] == "data", multi.losses.sharding
    assert len(multi.losses.sharding.device_set) == 8
    single = _step(_sample_losses, softmin, eqxjd.PerSampleGramian())(model, xs, ys)

    # The Gramian alone (one all-to-all, one psum), with 386 parameters: the columns
    # are padded to a multiple of 8.
    def gramian_of(strategy):
        fn = eqxjd.filter_value_and_gramian(_sample_losses, strategy=strategy)
        return eqx.filter_jit(fn)(model, xs, ys)

    results["data_parallel/gramian"] = _rel(
        gramian_of(data_parallel), gramian_of(eqxjd.PerSampleGramian())
    )
    results["data_parallel/gramian_gradients"] = _rel(
        gramian_of(gradients), gramian_of(eqxjd.PerSampleGramian())
    )
    _log("data_parallel/gramian")

    # A stateful weighting (computed by every device), a few steps.
    gradvac = eqxjd.GradVac()

    def train(strategy):
        step = eqxjd.filter_value_and_aggregate(
            _sample_losses, gradvac, strategy=strategy
        )
        state = step.init(model, xs, ys)
        jitted = eqx.filter_jit(step)
        m, outs = model, []
        for i in range(3):
            out = jitted(m, xs, ys, agg_state=state, agg_key=jr.key(i))
            state = out.state
            m = eqx.apply_updates(m, jtu.tree_map(lambda u: -0.1 * u, out.update))
            outs.append(out)
        return eqx.filter(m, eqx.is_array), outs

    results["data_parallel/gradvac_steps"] = _rel(
        train(data_parallel), train(eqxjd.PerSampleGramian())
    )
    _log("data_parallel/gradvac_steps")

    # The mesh set by `jax.set_mesh`, under `jit` and eagerly.
    with jax.set_mesh(mesh):
        ambient = eqxjd.filter_value_and_aggregate(
            _sample_losses, softmin, strategy=eqxjd.DataParallel()
        )
        results["data_parallel/ambient_mesh"] = _rel(
            eqx.filter_jit(ambient)(model, xs, ys), single
        )
        results["data_parallel/ambient_mesh_eager"] = _rel(
            ambient(model, xs, ys), single
        )
    _log("data_parallel/ambient_mesh")

    # Eager steps reuse their compilation.
    eager = eqxjd.filter_value_and_aggregate(
        _sample_losses, softmin, strategy=data_parallel
    )
    first = eager(model, xs, ys)
    before = _COMPILES[0]
    second = eager(model, xs, ys)
    assert _COMPILES[0] == before, _COMPILES[0] - before
    results["data_parallel/eager"] = _rel(second, first)
    _log("data_parallel/eager")

    # Parameters sharded over a "model" axis (FSDP-style), with the batch over
    # "data", over both axes (a tuple), or over "model" only (true FSDP: the same
    # axis splits the batch and the parameters). Updates keep the parameters'
    # sharding.
    mesh_2d = jax.make_mesh((2, 4), ("data", "model"))

    def fsdp(x):
        if eqx.is_array(x) and x.ndim == 2 and x.shape[0] % 4 == 0:
            return jax.device_put(x, NamedSharding(mesh_2d, P("model", None)))
        if eqx.is_array(x):
            return jax.device_put(x, NamedSharding(mesh_2d, P()))
        return x

    fsdp_model = jtu.tree_map(fsdp, model)
    params = jtu.tree_leaves(eqx.filter(fsdp_model, eqx.is_array))
    assert any(p.sharding.spec == P("model", None) for p in params)
    references = {
        name: _step(_sample_losses, aggregators[name], eqxjd.PerSampleGramian())(
            model, xs, ys
        )
        for name in ("softmin", "upgrad")
    }
    fsdp_cases = (
        ("data", "data", "softmin"),
        ("data", "data", "upgrad"),
        ("tuple", ("data", "model"), "softmin"),
        ("fsdp", "model", "softmin"),
    )
    for tag, axes, name in fsdp_cases:
        strategy = eqxjd.DataParallel(mesh_2d, axes)
        multi = _step(_sample_losses, aggregators[name], strategy)(fsdp_model, xs, ys)
        results[f"data_parallel/fsdp_{tag}/{name}"] = _rel(multi, references[name])
        for update, param in zip(jtu.tree_leaves(multi.update), params):
            assert update.sharding.is_equivalent_to(param.sharding, param.ndim), (
                update.sharding,
                param.sharding,
            )
        _log(f"data_parallel/fsdp_{tag}/{name}")

    # 2. GSPMD: the single-device code under plain jit with the batch sharded, on a
    #    mesh with Auto axes (XLA partitions it).
    auto_mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    shard = NamedSharding(auto_mesh, P("data"))
    step = _step(_sample_losses, softmin, eqxjd.PerSampleGramian(chunk_size=4))
    single = step(model, xs, ys)
    multi = step(model, jax.device_put(xs, shard), jax.device_put(ys, shard))
    results["gspmd/batch_sharded"] = _rel(multi, single)
    _log('"gspmd/batch_sharded"')

    # 3. GSPMD: parameters sharded (hidden units split over devices); G is a
    #    reduction over the parameter axis.
    def shard_param(x):
        if not eqx.is_array(x):
            return x
        if x.ndim == 2 and x.shape[0] % 8 == 0:
            return jax.device_put(x, NamedSharding(auto_mesh, P("data", None)))
        if x.ndim == 1 and x.shape[0] % 8 == 0:
            return jax.device_put(x, NamedSharding(auto_mesh, P("data")))
        return x

    sharded_model = jtu.tree_map(shard_param, model)
    assert any(
        len(leaf.sharding.device_set) == 8 for leaf in jtu.tree_leaves(sharded_model)
    )
    multi = step(sharded_model, xs, ys)
    results["gspmd/param_sharded"] = _rel(multi, single)
    _log('"gspmd/param_sharded"')

    gramian = eqx.filter_jit(
        eqxjd.filter_value_and_gramian(
            _sample_losses, strategy=eqxjd.Gramian(chunk_size=4)
        )
    )
    single = gramian(model, xs, ys)
    multi = gramian(sharded_model, xs, ys)
    results["gspmd/param_sharded_generic"] = _rel(multi, single)
    _log('"gspmd/param_sharded_generic"')

    # 4. Aggregators on a Jacobian sharded along its columns (parameters).
    jac = jr.normal(k4, (5, 64), jnp.float64)
    jac_sharded = jax.device_put(jac, NamedSharding(auto_mesh, P(None, "data")))
    aggregators = dict(_aggregators(), mean=eqxjd.Mean())
    for name, aggregator in aggregators.items():
        single = aggregator(jac)
        multi = eqx.filter_jit(aggregator)(jac_sharded)
        results[f"aggregator_param_sharded/{name}"] = _rel(multi, single)
        _log(f"aggregator_param_sharded/{name}")
    results["sharded_gramian"] = _rel(
        eqxjd.sharded_gramian(jac, mesh, "data"), jac @ jac.T
    )
    results["sharded_gramian_jit"] = _rel(
        jax.jit(lambda j: eqxjd.sharded_gramian(j, mesh, "data"))(
            jax.device_put(jac, NamedSharding(mesh, P(None, "data")))
        ),
        jac @ jac.T,
    )
    # Eager calls reuse their compilation; gradients eagerly and under `jit`, on the
    # default (explicit-axes) mesh and on the mesh set by `jax.set_mesh` with tuple
    # axes.
    before = _COMPILES[0]
    eqxjd.sharded_gramian(jac, mesh, "data")
    assert _COMPILES[0] == before, _COMPILES[0] - before

    def loss(j):
        return jnp.sum(eqxjd.sharded_gramian(j, mesh, "data") ** 2)

    expected = jax.grad(lambda j: jnp.sum((j @ j.T) ** 2))(jac)
    results["sharded_gramian_grad"] = _rel(jax.grad(loss)(jac), expected)
    results["sharded_gramian_jit_grad"] = _rel(jax.jit(jax.grad(loss))(jac), expected)
    with jax.set_mesh(mesh_2d):
        results["sharded_gramian_ambient"] = _rel(
            jax.jit(lambda j: eqxjd.sharded_gramian(j, axis_name=("data", "model")))(
                jac
            ),
            jac @ jac.T,
        )
    _log("sharded_gramian")

    # 5. With several CPU devices, batched LAPACK calls are issued one matrix at a
    #    time: the same numbers as the batched calls.
    from eqxjd import _linalg

    assert _linalg.several_cpu_devices()
    a = jr.normal(k4, (6, 5, 5), jnp.float64)
    a = a @ jnp.swapaxes(a, 1, 2) + 5 * jnp.eye(5)[None]
    b = jr.normal(k4, (6, 5, 2), jnp.float64)
    factor = jax.lax.linalg.cholesky(a)
    pairs = (
        (_linalg.cholesky(a), factor),
        (
            _linalg.triangular_solve(factor, b, left_side=True, lower=True),
            jax.lax.linalg.triangular_solve(factor, b, left_side=True, lower=True),
        ),
        (_linalg.solve(a, b), jnp.linalg.solve(a, b)),
        (
            _linalg.map_lanes(jnp.linalg.cholesky, a),
            jax.vmap(jnp.linalg.cholesky)(a),
        ),
    )
    results["linalg/one_at_a_time"] = max(_rel(x, y) for x, y in pairs)
    jaxpr = str(jax.make_jaxpr(_linalg.cholesky)(a))
    assert "platform_index" in jaxpr and "scan" in jaxpr, jaxpr

    # 6. Clear errors.
    for bad in (
        lambda: eqxjd.sharded_gramian(jac[:, :60], mesh, "data"),
        lambda: eqxjd.sharded_gramian(jac, mesh, "model"),
        lambda: _step(_sample_losses, softmin, data_parallel)(model, xs[:12], ys[:12]),
        lambda: eqxjd.DataParallel(mesh, "model"),
        lambda: eqxjd.DataParallel(mesh, ("data", "data")),
        lambda: _step(_sample_losses, softmin, eqxjd.DataParallel())(model, xs, ys),
    ):
        try:
            bad()
        except ValueError:
            pass
        else:
            raise AssertionError("expected a ValueError")
    return results


if __name__ == "__main__":
    print(json.dumps(main()))
