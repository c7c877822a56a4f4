"""A data-parallel UPGrad step at a size where batched LAPACK calls on 8 host devices
deadlocked XLA:CPU's thread pool, for tests/test_sharding.py (run in a subprocess
with a timeout: a hang fails the test instead of blocking it).

Batch 256 on 8 CPU devices, a tiny model: UPGrad with its lane QPs split over the
devices, and a stateful wrapper of UPGrad whose QP every device solves whole. Prints
one JSON object `{case: seconds for its steps, compilation included}` on its last
line. (Their agreement with one device is checked at smaller sizes.)
"""

import os


os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
)

import json
import sys
import time


_T0 = time.perf_counter()

import equinox as eqx
import jax


jax.config.update("jax_enable_x64", True)

import eqxjd
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np


_BATCH = 256
_STEPS = 2


def _log(msg):
    print(f"{time.perf_counter() - _T0:.1f}s {msg}", file=sys.stderr, flush=True)


def _losses(model, xs, ys):
    return jnp.sum((jax.vmap(model)(xs) - ys) ** 2, axis=1)


def _train(aggregator, strategy, model, xs, ys):
    step = eqxjd.filter_value_and_aggregate(_losses, aggregator, strategy=strategy)
    state = step.init(model, xs, ys)

    @eqx.filter_jit
    def train_step(model, state):
        out = step(model, xs, ys, agg_state=state)
        update = jtu.tree_map(lambda u: -0.1 * u, out.update)
        return eqx.apply_updates(model, update), out.state, out.weights

    for _ in range(_STEPS):
        model, state, weights = train_step(model, state)
        weights = np.asarray(weights)
        assert weights.shape == (_BATCH,)
        assert np.all(np.isfinite(weights)) and np.all(weights >= 0), weights


def main() -> dict[str, float]:
    assert jax.device_count() == 8, jax.devices()
    mesh = jax.make_mesh((8,), ("data",))
    kmodel, kx, ky = jr.split(jr.key(0), 3)
    model = eqx.nn.MLP(2, 1, 2, 1, activation=jnp.tanh, key=kmodel)
    xs = jr.normal(kx, (_BATCH, 2))
    ys = jr.normal(ky, (_BATCH, 1))
    aggregators = {
        "upgrad": eqxjd.UPGrad(),
        "cr_mogm_upgrad": eqxjd.StatefulWeightedAggregator(
            eqxjd.CRMOGMWeighting(eqxjd.UPGradWeighting())
        ),
    }
    results = {}
    for name, aggregator in aggregators.items():
        start = time.perf_counter()
        _train(aggregator, eqxjd.DataParallel(mesh, "data"), model, xs, ys)
        results[name] = time.perf_counter() - start
        _log(name)
    return results


if __name__ == "__main__":
    print(json.dumps(main()))
