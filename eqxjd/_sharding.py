r"""Jacobian descent across devices with `jax.sharding` / `jax.shard_map`.

Two layouts of the Jacobian $J \in \mathbb{R}^{m \times n}$:

- **along the parameters** (columns): each device holds $J_d$, a block of columns, and
  $G = \sum_d J_d J_d^\top$ is one all-reduce ([`eqxjd.sharded_gramian`][]). Under
  `jax.jit` with sharded inputs, XLA inserts the same reduction by itself, so every
  Gramian strategy of [`eqxjd.filter_value_and_aggregate`][] work unchanged.
- **along the batch** (rows, data parallel, [`eqxjd.DataParallel`][]): each device
  computes the per-sample Jacobians of its share of the batch; the blocks
  $J_d J_e^\top$ are formed by passing the local Jacobians around a ring
  (`ppermute`), the row blocks of $G$ are all-gathered, one device computes the
  weights from $G$ and broadcasts them, and the update is a local VJP followed by a
  `psum`. Memory per device: two local per-sample Jacobians, never the full one.
"""

from collections.abc import Callable
from typing import ClassVar

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jaxtyping import Array, Float, PyTree

from ._checks import check_matrix
from ._gramian import (
    batch_size,
    block,
    flat_rows,
    per_sample_vector_fn,
    symmetrize,
)
from ._step import AbstractStrategy, Linearized, weigh


_HIGHEST = lax.Precision.HIGHEST


def _place(mesh: Mesh, tree: PyTree, spec: P) -> PyTree:
    sharding = NamedSharding(mesh, spec)
    return jtu.tree_map(lambda x: jax.device_put(x, sharding), tree)


def check_mesh_axis(mesh: Mesh, axis_name: str) -> int:
    if axis_name not in mesh.axis_names:
        raise ValueError(
            f"`axis_name` {axis_name!r} is not an axis of the mesh {mesh.axis_names}."
        )
    return mesh.shape[axis_name]


def on_one_device(fn: Callable, mesh: Mesh, *args: PyTree) -> PyTree:
    """`fn(*args)` (replicated arguments) computed by the first device of `mesh` only
    and broadcast to all of them.

    Why not on every device: on CPU, jaxlib's batched LAPACK kernels (e.g. the Cholesky
    factorisations of UPGrad's solver) split their batch over XLA's intra-op thread
    pool and block until it is done. With every device of the mesh doing so at once,
    all the pool's threads wait and none is left to do the work: a deadlock (seen with
    8 host devices). Here one device uses the pool; the others wait in the `psum` on
    XLA's per-device threads, outside the pool.
    """
    axes = mesh.axis_names

    def skip(*args):
        shapes = jax.eval_shape(fn, *args)
        return jtu.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    def body(*args):
        out = lax.cond(lax.axis_index(axes) == 0, fn, skip, *args)
        # The other devices contribute zeros, so the sum is the first device's value.
        return jtu.tree_map(lambda x: lax.psum(x, axes).astype(x.dtype), out)

    return jax.shard_map(body, mesh=mesh, in_specs=P(), out_specs=P(), check_vma=False)(
        *args
    )


def sharded_gramian(
    jacobian: Float[Array, "m n"], mesh: Mesh, axis_name: str
) -> Float[Array, "m m"]:
    r"""$G = J J^\top$ with the columns (parameters) of $J$ split over a mesh axis:
    each device contracts its own columns and the partial Gramians are summed with one
    `psum`. The result is replicated.

    **Arguments:**

    - `jacobian`: an array of shape `(m, n)`; `n` must be divisible by the size of
        the mesh axis. It is resharded as `P(None, axis_name)` if needed.
    - `mesh`: a `jax.sharding.Mesh`.
    - `axis_name`: the mesh axis that splits the parameters.

    **Returns:**

    The Gramian, shape `(m, m)`, replicated over the mesh.
    """
    check_matrix(jacobian)
    size = check_mesh_axis(mesh, axis_name)
    if jacobian.shape[1] % size:
        raise ValueError(
            f"The {jacobian.shape[1]} columns of `jacobian` cannot be split evenly "
            f"over the {size} devices of mesh axis {axis_name!r}."
        )

    def local(block):
        part = jnp.matmul(block, block.T, precision=_HIGHEST)
        return lax.psum(part, axis_name)

    jacobian = jax.device_put(jacobian, NamedSharding(mesh, P(None, axis_name)))
    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=P(None, axis_name),
        out_specs=P(),
        check_vma=False,
    )(jacobian)


class DataParallel(AbstractStrategy):
    r"""[`eqxjd.PerSampleGramian`][] with the batch split over a mesh axis
    (data-parallel instance-wise Jacobian descent).

    The model (and the aggregator's state and key) are replicated, the positional
    arguments are split along `axis_name`. Each device computes the per-sample
    Jacobians $J_d$ of its `B / D` samples; the Gramian blocks $J_d J_e^\top$ are
    obtained by passing $J_e$ around a ring of the `D` devices (`D` `ppermute`s), the
    row blocks of $G$ are all-gathered, the weights are computed from $G$ by one
    device and broadcast (on CPU, every device running the weighting's batched LAPACK
    calls at once can deadlock XLA's thread pool), and the update is each device's
    VJP of $\sum_{i \in d} w_i \ell_i$ (one more local forward pass), summed with a
    `psum`. The result equals the single-device [`eqxjd.PerSampleGramian`][] step.
    Call the step under `jax.jit` / `eqx.filter_jit`; `has_aux=True` is not
    supported.
    """

    mesh: Mesh = eqx.field(static=True)
    axis_name: str = eqx.field(static=True)

    # The losses' auxiliary output would need one more forward pass of the batch.
    returns_aux: ClassVar[bool] = False

    def __check_init__(self):
        check_mesh_axis(self.mesh, self.axis_name)

    def linearize(self, f, diff, gram_spec, batch, batched_f) -> Linearized:
        mesh, axis_name = self.mesh, self.axis_name
        devices = check_mesh_axis(mesh, axis_name)
        size = batch_size(batch)
        if size % devices:
            raise ValueError(
                f"The batch size {size} is not divisible by the {devices} devices of "
                f"mesh axis {axis_name!r}."
            )
        local_size = size // devices
        batch_specs = tuple(jtu.tree_map(lambda _: P(axis_name), b) for b in batch)

        def local_losses(d, local_batch):
            losses, _ = batched_f(d, *local_batch)
            if losses.ndim not in (1, 2) or losses.shape[0] != local_size:
                raise ValueError(
                    "With `DataParallel`, the losses of a batch must have shape (B,) "
                    f"or (B, T); got {losses.shape} on a local batch of {local_size}."
                )
            return losses

        def gramian_part(diff, *local_batch):
            losses = local_losses(diff, local_batch)
            gram, rest = eqx.partition(lax.stop_gradient(diff), gram_spec)
            tasks = 1 if losses.ndim == 1 else losses.shape[1]
            width = local_size * tasks
            vec = per_sample_vector_fn(
                lambda g, *b: batched_f(eqx.combine(g, rest), *b)[0]
            )
            jac = jax.vmap(jax.jacrev(vec), in_axes=(None,) + (0,) * len(local_batch))(
                gram, *local_batch
            )
            mine = flat_rows(jac, width)
            index = lax.axis_index(axis_name)
            perm = [(j, (j + 1) % devices) for j in range(devices)]

            def step(s, carry):
                rows, visiting = carry
                source = (index - lax.convert_element_type(s, index.dtype)) % devices
                blk = block(mine, visiting, losses.dtype)
                start = (jnp.zeros((), index.dtype), source * width)
                rows = lax.dynamic_update_slice(rows, blk, start)
                visiting = [lax.ppermute(v, axis_name, perm) for v in visiting]
                return rows, visiting

            rows = jnp.zeros((width, devices * width), losses.dtype)
            rows, _ = lax.fori_loop(0, devices, step, (rows, mine))
            return losses, lax.all_gather(rows, axis_name, tiled=True)

        def update_part(diff, cotangent, *local_batch):
            _, vjp = jax.vjp(lambda d: local_losses(d, local_batch), diff)
            (updates,) = vjp(cotangent)
            return lax.psum(updates, axis_name)

        diff = _place(mesh, diff, P())
        batch = tuple(_place(mesh, b, P(axis_name)) for b in batch)
        losses, g = jax.shard_map(
            gramian_part,
            mesh=mesh,
            in_specs=(P(),) + batch_specs,
            out_specs=(P(axis_name), P()),
            check_vma=False,
        )(diff, *batch)

        def vjp(cotangent):
            local = _place(mesh, cotangent, P(axis_name))
            return jax.shard_map(
                update_part,
                mesh=mesh,
                in_specs=(P(), P(axis_name)) + batch_specs,
                out_specs=P(),
                check_vma=False,
            )(diff, local, *batch)

        def weigh_on_one_device(weighting, g, state, key):
            return on_one_device(
                lambda g, state, key: weigh(weighting, g, state, key),
                mesh,
                *_place(mesh, (g, state, key), P()),
            )

        return Linearized(losses, None, None, symmetrize(g), vjp, weigh_on_one_device)


DataParallel.__init__.__doc__ = """**Arguments:**

- `mesh`: a `jax.sharding.Mesh`.
- `axis_name`: the mesh axis the batch is split over; the batch size must be
    divisible by its size.
"""
