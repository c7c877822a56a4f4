"""Data-parallel instance-wise risk minimisation on a device mesh.

The batch is split over the devices of a mesh axis: the step of
`examples/iwrm_gramian.py` with `strategy=eqxjd.DataParallel(mesh, "data")` computes
each device's per-sample Jacobians, redistributes them once (an all-to-all: every
device gets all the rows of its share of the columns), sums the devices' partial
Gramians into the replicated `(B, B)` Gramian, splits UPGrad's lane QPs over the
devices and sums the devices' VJPs. The full `(B, n)` Jacobian exists nowhere. The
same step on one device (`strategy=eqxjd.PerSampleGramian()`) gives the same numbers.

Run as a script, it asks XLA for 8 CPU devices (set before JAX starts); imported into a
process where JAX already runs, it uses the devices it finds.
"""

import os


if "jax" not in __import__("sys").modules:
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import pathlib
import sys

import equinox as eqx
import eqxjd
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np


sys.path.insert(0, str(pathlib.Path(__file__).parent))
from iwrm_gramian import make_model, per_sample_losses, save_plot  # noqa: E402


def main(steps=60, quick=False, seed=0, lr=0.1, batch_size=32):
    """Returns the mean batch loss per step, shape (steps, 1)."""
    if quick:
        steps = 4
    devices = jax.device_count()
    batch_size = max(batch_size // devices, 1) * devices  # divisible by the mesh
    mesh = jax.make_mesh((devices,), ("data",))
    print(f"mesh: {devices} device(s) on axis 'data', batch {batch_size}")
    kmodel, kx, ky = jr.split(jr.key(seed), 3)
    x_host = np.asarray(jr.normal(kx, (batch_size, 10)))
    y_host = np.asarray(jr.normal(ky, (batch_size,)))
    batch_sharding = jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec("data")
    )
    x = jax.device_put(x_host, batch_sharding)
    y = jax.device_put(y_host, batch_sharding)
    data_parallel = eqxjd.filter_value_and_aggregate(
        per_sample_losses, eqxjd.UPGrad(), strategy=eqxjd.DataParallel(mesh, "data")
    )

    @eqx.filter_jit
    def step(model, x, y):
        out = data_parallel(model, x, y)
        model = eqx.apply_updates(model, jtu.tree_map(lambda u: -lr * u, out.update))
        return model, out

    single = eqx.filter_jit(
        eqxjd.filter_value_and_aggregate(
            per_sample_losses, eqxjd.UPGrad(), strategy=eqxjd.PerSampleGramian()
        )
    )
    model = make_model(kmodel)
    # The reference step on one device, before the model is replicated (a replicated
    # model would make every device run it).
    reference = single(model, jnp.asarray(x_host), jnp.asarray(y_host))
    # Replicate the parameters on the mesh up front: every step then sees the same
    # input shardings (one compilation).
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    model = eqx.filter(model, eqx.is_array)
    model = eqx.combine(jax.device_put(model, replicated), make_model(kmodel))
    history = []
    for i in range(steps):
        model, out = step(model, x, y)
        if i == 0:
            diff = max(
                float(jnp.max(jnp.abs(a - b)))
                for a, b in zip(jtu.tree_leaves(out), jtu.tree_leaves(reference))
            )
            print(f"step 0: max |data parallel - one device| = {diff:.2e}")
            print(f"losses sharded as {out.losses.sharding.spec}")
        history.append(float(jnp.mean(out.losses)))
        if i % max(steps // 5, 1) == 0 or i == steps - 1:
            print(f"step {i:3d}   mean loss {history[-1]:.5f}")
    history = np.asarray(history)[:, None]
    path = save_plot(
        {"data-parallel IWRM (UPGrad)": history[:, 0]},
        "sharded_iwrm",
        f"IWRM on {devices} device(s)",
        xlabel="step",
    )
    print(f"plot saved to {path}")
    return history


if __name__ == "__main__":
    main()
