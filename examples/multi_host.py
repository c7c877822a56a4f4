"""Data-parallel instance-wise risk minimisation across processes.

One process per host joins JAX's distributed runtime; the batch is split over every
device of every process. Each process loads only its own share of the data and
assembles it into a global array with `jax.make_array_from_process_local_data`; the
model is built from the same key on every process, so it starts replicated. Two
processes with 4 CPU devices each on one machine:

    XLA_FLAGS=--xla_force_host_platform_device_count=4 \
        python examples/multi_host.py 0 2 127.0.0.1:12355 &
    XLA_FLAGS=--xla_force_host_platform_device_count=4 \
        python examples/multi_host.py 1 2 127.0.0.1:12355

On a cluster, start one process per host with its own process id and the address of
process 0.
"""

import sys

import equinox as eqx
import eqxjd
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P


def per_sample_losses(model, x, y):
    return (jax.vmap(model)(x)[:, 0] - y) ** 2


def load_shard(process_id: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """This process's samples (here generated; a data loader would read its files)."""
    key = jr.fold_in(jr.key(1), process_id)
    x = np.asarray(jr.normal(key, (size, 3)))
    y = np.sin(x[:, 0]) + 0.5 * x[:, 1] * x[:, 2]
    return x, y


def train(steps=40, lr=0.1, per_device=8):
    """Trains on every device of every process (JAX's distributed runtime already
    running), with `per_device` samples per device; returns the mean batch loss per
    step, shape (steps,), on every process."""
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    rows = NamedSharding(mesh, P("data"))
    # The global batch is per_device * jax.device_count() samples.
    local_size = per_device * jax.local_device_count()
    x_local, y_local = load_shard(jax.process_index(), local_size)
    x = jax.make_array_from_process_local_data(rows, x_local)
    y = jax.make_array_from_process_local_data(rows, y_local)

    model = eqx.nn.MLP(3, 1, 16, 2, activation=jnp.tanh, key=jr.key(0))
    step = eqxjd.filter_value_and_aggregate(
        per_sample_losses, eqxjd.UPGrad(), strategy=eqxjd.DataParallel(mesh, "data")
    )

    # The batch is passed as an argument: a jitted function cannot close over arrays
    # that span other processes' devices.
    @eqx.filter_jit
    def train_step(model, x, y):
        out = step(model, x, y)
        model = eqx.apply_updates(model, jtu.tree_map(lambda u: -lr * u, out.update))
        return model, jnp.mean(out.losses)

    history = []
    for i in range(steps):
        model, loss = train_step(model, x, y)
        # `loss` is replicated: every process holds its value.
        history.append(float(loss.addressable_data(0)))
        if jax.process_index() == 0 and (i % 10 == 0 or i == steps - 1):
            print(f"step {i:3d}   mean loss ({x.shape[0]} samples) {history[-1]:.5f}")
    return np.asarray(history)


def main(process_id: int, num_processes: int, coordinator: str, steps=40, lr=0.1):
    """Joins the runtime, trains, leaves; returns `train`'s losses."""
    jax.distributed.initialize(
        coordinator_address=coordinator,
        num_processes=num_processes,
        process_id=process_id,
    )
    history = train(steps, lr)
    jax.distributed.shutdown()
    return history


if __name__ == "__main__":
    process_id, num_processes, coordinator = sys.argv[1:4]
    steps = int(sys.argv[4]) if len(sys.argv) > 4 else 40
    main(int(process_id), int(num_processes), coordinator, steps)
