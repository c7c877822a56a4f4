"""One process of the two-process data-parallel run of tests/test_multi_host.py.

`python tests/multi_host_worker.py PROCESS_ID PORT OUT_DIR` joins JAX's distributed
runtime (coordinator on 127.0.0.1:PORT, 2 processes with 4 CPU devices each), trains
the problem below for a few steps with `eqxjd.DataParallel` on the 8-device global
mesh, each process passing only its half of the batch, and writes the final
parameters to `OUT_DIR/process_{PROCESS_ID}.npz`, with the losses of a few steps of
`examples/multi_host.py` (its `train`, in the same runtime). The test imports
`problem` and `train` to compute the same run on one device.
"""

import importlib.util
import os
import pathlib
import sys
import time
from typing import Any


if __name__ == "__main__":
    # Before JAX starts: 4 CPU devices in this process.
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    )

import equinox as eqx
import eqxjd
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P


BATCH = 16
STEPS = 3
LEARNING_RATE = 0.1
EXAMPLE_STEPS = 3
_EXAMPLE = pathlib.Path(__file__).parent.parent / "examples" / "multi_host.py"
_T0 = time.perf_counter()


def _log(msg: str) -> None:
    # To the process's log, which the test shows when the run fails.
    print(f"{time.perf_counter() - _T0:.1f}s {msg}", file=sys.stderr, flush=True)


def _example():
    spec = importlib.util.spec_from_file_location("multi_host_example", _EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def aggregators() -> dict:
    # UPGrad (lane QPs split over the devices) and a stateful, random method (weights
    # computed by every device; the key is the same on every process).
    return {"upgrad": eqxjd.UPGrad(), "gradvac": eqxjd.GradVac()}


def problem():
    kmodel, kx, ky = jr.split(jr.key(0), 3)
    model = eqx.nn.MLP(3, 2, 8, 2, activation=jnp.tanh, key=kmodel)
    xs = jr.normal(kx, (BATCH, 3))
    ys = jr.normal(ky, (BATCH, 2))
    return model, xs, ys


def losses(model, xs, ys):
    return jnp.sum((jax.vmap(model)(xs) - ys) ** 2, axis=1)


def train(aggregator, strategy, model, xs, ys):
    """`STEPS` steps of plain Jacobian descent; returns the parameters' leaves."""
    step = eqxjd.filter_value_and_aggregate(losses, aggregator, strategy=strategy)
    state = step.init(model, xs, ys)

    # The batch is an argument: a jitted function cannot close over arrays that span
    # other processes' devices.
    @eqx.filter_jit
    def train_step(model, state, key, xs, ys):
        out = step(model, xs, ys, agg_state=state, agg_key=key)
        update = jtu.tree_map(lambda u: -LEARNING_RATE * u, out.update)
        return eqx.apply_updates(model, update), out.state

    for i in range(STEPS):
        model, state = train_step(model, state, jr.key(i), xs, ys)
    return jtu.tree_leaves(eqx.filter(model, eqx.is_array))


def main(process_id: int, port: int, out_dir: str) -> None:
    jax.config.update("jax_enable_x64", True)
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=2,
        process_id=process_id,
        initialization_timeout=60,
        heartbeat_timeout_seconds=20,
        shutdown_timeout_seconds=20,
    )
    assert jax.device_count() == 8 and jax.local_device_count() == 4
    _log("runtime up")
    mesh = jax.make_mesh((8,), ("data",))
    sharding = NamedSharding(mesh, P("data"))
    model, xs, ys = problem()
    # This process's rows of the batch, as a data loader would provide them.
    indices = sharding.addressable_devices_indices_map(xs.shape).values()
    rows = sorted(
        {
            i
            for index in indices
            if index is not None
            for i in range(*index[0].indices(BATCH))
        }
    )
    local_x, local_y = np.asarray(xs)[rows], np.asarray(ys)[rows]
    strategy = eqxjd.DataParallel(mesh, "data")

    # Host-local halves would silently train on half of the batch: rejected.
    try:
        train(eqxjd.UPGrad(), strategy, model, local_x, local_y)
    except ValueError as e:
        assert "global arrays" in str(e), e
        rejected = True
    else:
        rejected = False
    _log("host-local batch checked")

    global_x = jax.make_array_from_process_local_data(sharding, local_x)
    global_y = jax.make_array_from_process_local_data(sharding, local_y)
    assert global_x.shape == xs.shape
    out: dict[str, Any] = {"rejected_host_local": np.asarray(rejected)}
    for name, aggregator in aggregators().items():
        leaves = train(aggregator, strategy, model, global_x, global_y)
        for i, leaf in enumerate(leaves):
            assert leaf.sharding.is_fully_replicated
            out[f"{name}/{i}"] = np.asarray(leaf.addressable_data(0))
        _log(name)
    out["example"] = _example().train(steps=EXAMPLE_STEPS, per_device=2)
    _log("example")
    np.savez(os.path.join(out_dir, f"process_{process_id}.npz"), **out)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
