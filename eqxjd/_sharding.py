r"""Jacobian descent across devices and processes, with `jax.sharding` and
`jax.shard_map`.

Two layouts of the Jacobian $J \in \mathbb{R}^{m \times n}$:

- **along the parameters** (columns): each device holds $J_d$, a block of columns, and
  $G = \sum_d J_d J_d^\top$ is one all-reduce ([`eqxjd.sharded_gramian`][]).
- **along the batch** (rows, data parallel, [`eqxjd.DataParallel`][]): each device
  computes the per-sample Jacobians of its share of the batch; one all-to-all gives
  every device all the rows of its share of the columns, one all-reduce sums the
  devices' $J_{:,c} J_{:,c}^\top$ into $G$, the weights are computed on every device
  (UPGrad: each device solves its share of the objectives' QPs, and one all-reduce
  sums their contributions), and the update is each device's VJP, reduced onto the
  parameters' own sharding.
"""

import functools as ft
import math
from collections.abc import Callable
from typing import Any, ClassVar, Literal

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
from jax.core import Tracer
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec as P
from jaxtyping import Array, Float, PyTree

from ._aggregation.upgrad import UPGradWeighting
from ._checks import check_gramian, check_matrix, check_method
from ._gramian import (
    batch_size,
    exchanged_gramian,
    flat_rows,
    per_sample_vector_fn,
    structured_value_and_gramian,
    symmetrize,
)
from ._misc import pref_weights
from ._results import RESULTS
from ._step import AbstractStrategy, Linearized, weigh


_HIGHEST = lax.Precision.HIGHEST
AxisNames = str | tuple[str, ...]
AnyMesh = Mesh | AbstractMesh
# Per array dimension, the mesh axes it is split over (empty: not split).
Dims = tuple[tuple[str, ...], ...]


# --------------------------------------------------------------------------- meshes


def _as_axes(axis_name: AxisNames) -> tuple[str, ...]:
    axes = (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)
    if not axes or not all(isinstance(a, str) for a in axes):
        raise ValueError(
            "`axis_name` must be a mesh axis name or a non-empty tuple of them; got "
            f"{axis_name!r}."
        )
    if len(set(axes)) != len(axes):
        raise ValueError(f"`axis_name` repeats a mesh axis: {axis_name!r}.")
    return axes


def check_mesh_axis(mesh: AnyMesh, axis_name: AxisNames) -> int:
    """The number of devices along the mesh axes `axis_name`."""
    axes = _as_axes(axis_name)
    for axis in axes:
        if axis not in mesh.axis_names:
            raise ValueError(
                f"`axis_name` {axis!r} is not an axis of the mesh {mesh.axis_names}."
            )
    return math.prod(mesh.shape[axis] for axis in axes)


def _current_mesh(mesh: Mesh | None) -> AnyMesh:
    """`mesh`, or else the one set by `jax.set_mesh` (concrete outside `jit`, abstract
    inside)."""
    if mesh is not None:
        return mesh
    abstract = jax.sharding.get_abstract_mesh()
    if abstract.empty:
        raise ValueError(
            "No mesh: pass `mesh=` or call the step inside `with jax.set_mesh(mesh):`."
        )
    try:
        concrete = jax.sharding.get_mesh()
    except ValueError:  # inside `jit`, where only the abstract mesh is known
        return abstract
    return abstract if concrete.empty else concrete


def _entry(axes: tuple[str, ...]) -> str | tuple[str, ...] | None:
    """A `PartitionSpec` entry for a dimension split over `axes`."""
    if not axes:
        return None
    return axes[0] if len(axes) == 1 else axes


def _place(tree: PyTree, mesh: AnyMesh, spec: P) -> PyTree:
    """Every array of `tree` laid out as `spec` on `mesh` (a no-op when it already is,
    and what `shard_map` needs of its inputs on meshes with explicit axes)."""
    sharding = NamedSharding(mesh, spec)

    def put(x):
        if isinstance(mesh, AbstractMesh):
            return jax.sharding.reshard(x, sharding)
        return jax.device_put(x, sharding)

    return jtu.tree_map(put, tree)


def _concrete(x: Any) -> bool:
    """Whether `x` is a `jax.Array` with values (not a tracer)."""
    return isinstance(x, jax.Array) and not isinstance(x, Tracer)


def _spans_processes(mesh: AnyMesh) -> bool:
    if isinstance(mesh, Mesh):
        return len({d.process_index for d in mesh.devices.flat}) > 1
    return jax.process_count() > 1


def _is_global(x: Any) -> bool:
    """Whether `x` is an array laid out on a mesh (under `jit`: typed so), as opposed
    to a host-local value (NumPy, Python, or a `jax.Array` on this process only)."""
    if _concrete(x):
        return not x.is_fully_addressable
    sharding = getattr(jax.typeof(x), "sharding", None)
    return sharding is not None and not sharding.mesh.empty


def _check_global_batch(batch: tuple, mesh: AnyMesh) -> None:
    if not _spans_processes(mesh):
        return
    for i, leaf in enumerate(jtu.tree_leaves(batch)):
        if not _is_global(leaf):
            raise ValueError(
                "`DataParallel` across processes needs the batch as global arrays; "
                f"batch leaf {i} (shape {jnp.shape(leaf)}) is a host-local value "
                "(NumPy, or a `jax.Array` on this process's devices only), which "
                "every process would pass as if it were the whole batch. Assemble "
                "each process's share with `jax.make_array_from_process_local_data("
                "NamedSharding(mesh, PartitionSpec(axis_name)), local_batch)`."
            )


def _param_dims(x: Any, mesh: AnyMesh) -> Dims:
    """How a parameter is split over `mesh`: read from its sharding (a concrete array)
    or its type (a tracer, on a mesh with explicit axes). Unknown layouts are
    replicated."""
    spec = None
    sharding = getattr(x, "sharding", None)
    if _concrete(x) and isinstance(sharding, NamedSharding):
        spec = sharding.spec
    else:
        typed = getattr(jax.typeof(x), "sharding", None)
        if typed is not None and not typed.mesh.empty:
            spec = typed.spec
    ndim = jnp.ndim(x)
    if spec is None:
        return ((),) * ndim
    entries = tuple(spec) + (None,) * (ndim - len(spec))
    dims = []
    for entry in entries:
        if entry is None or entry is P.UNCONSTRAINED:
            dims.append(())
        else:
            dims.append(_as_axes(entry))
    for axes in dims:
        for axis in axes:
            if axis not in mesh.axis_names:
                raise ValueError(
                    f"A parameter is sharded over the axis {axis!r}, which is not an "
                    f"axis of the strategy's mesh {mesh.axis_names}."
                )
    return tuple(dims)


def _spec(dims: Dims) -> P:
    return P(*(_entry(axes) for axes in dims))


def _gather(x: Array, dims: Dims) -> Array:
    """The whole parameter from this device's shard (FSDP's all-gather)."""
    for dim, axes in enumerate(dims):
        if axes:
            x = lax.all_gather(x, axes, axis=dim, tiled=True)
    return x


def _reduce(g: Array, dims: Dims, axes: tuple[str, ...]) -> Array:
    """The sum over all devices of a full-size gradient, left on the parameter's own
    shard: reduce-scatters along its split dimensions, all-reduce over the rest."""
    used = set()
    for dim, split in enumerate(dims):
        if split:
            g = lax.psum_scatter(g, split, scatter_dimension=dim, tiled=True)
            used.update(split)
    rest = tuple(axis for axis in axes if axis not in used)
    return lax.psum(g, rest) if rest else g


# ---------------------------------------------------------------- sharded Gramian


def _auto(mesh: Mesh) -> Mesh:
    return Mesh(
        mesh.devices,
        mesh.axis_names,
        axis_types=(AxisType.Auto,) * len(mesh.axis_names),
    )


def _untyped(x: Any) -> bool:
    """No mesh in sight: no `jax.set_mesh` context and `x` not laid out on a mesh."""
    if not jax.sharding.get_abstract_mesh().empty:
        return False
    if _concrete(x):
        return not isinstance(x.sharding, NamedSharding)
    typed = getattr(jax.typeof(x), "sharding", None)
    return typed is None or typed.mesh.empty


@eqx.filter_jit
def _sharded_gramian(jacobian, mesh, axes):
    def local(block):
        return lax.psum(jnp.matmul(block, block.T, precision=_HIGHEST), axes)

    spec = P(None, _entry(axes))
    jacobian = _place(jacobian, mesh, spec)
    return jax.shard_map(
        local, mesh=mesh, in_specs=spec, out_specs=P(), check_vma=False
    )(jacobian)


def sharded_gramian(
    jacobian: Float[Array, "m n"],
    mesh: Mesh | None = None,
    axis_name: str | tuple[str, ...] | None = None,
) -> Float[Array, "m m"]:
    r"""$G = J J^\top$ with the columns (parameters) of $J$ split over mesh axes: each
    device contracts its own columns and the partial Gramians are summed with one
    `psum`. The result is replicated.

    Differentiable (`jax.grad`, under `jit` or not), and an eager call compiles once
    per shape.

    **Arguments:**

    - `jacobian`: an array of shape `(m, n)`; `n` must be divisible by the number of
        devices along `axis_name`. It is resharded as `P(None, axis_name)` if needed.
    - `mesh`: a `jax.sharding.Mesh`; `None` (default) uses the mesh set by
        `jax.set_mesh`.
    - `axis_name`: the mesh axis, or tuple of axes, that splits the parameters;
        `None` (default) means every axis of the mesh.

    **Returns:**

    The Gramian, shape `(m, m)`, replicated over the mesh.
    """
    check_matrix(jacobian)
    current = _current_mesh(mesh)
    axes = tuple(current.axis_names) if axis_name is None else _as_axes(axis_name)
    size = check_mesh_axis(current, axes)
    if jacobian.shape[1] % size:
        raise ValueError(
            f"The {jacobian.shape[1]} columns of `jacobian` cannot be split evenly "
            f"over the {size} devices of mesh axes {axes}."
        )
    if isinstance(current, Mesh) and _untyped(jacobian):
        # Without a mesh context, arrays typed with explicit mesh axes break eager
        # autodiff (the cotangent of a scalar loss is made on one device): compute on
        # the same devices with automatic axes, as a plain sharded computation.
        current = _auto(current)
    return _sharded_gramian(jacobian, current, axes)


# ------------------------------------------------------------------- data parallel


class _Layout(eqx.Module):
    """How a step is laid out: the mesh, its axes (the batch axes first), and how each
    differentiated leaf is split."""

    mesh: AnyMesh = eqx.field(static=True)
    axes: tuple[str, ...] = eqx.field(static=True)
    leaf_dims: tuple[Dims, ...] = eqx.field(static=True)

    @property
    def size(self) -> int:
        return math.prod(self.mesh.shape[axis] for axis in self.axes)

    @property
    def rows(self) -> P:
        return P(_entry(self.axes))

    def param_specs(self, diff: PyTree) -> PyTree:
        treedef = jtu.tree_structure(diff)
        return jtu.tree_unflatten(treedef, [_spec(d) for d in self.leaf_dims])

    def gather(self, diff: PyTree) -> PyTree:
        leaves, treedef = jtu.tree_flatten(diff)
        full = [_gather(x, d) for x, d in zip(leaves, self.leaf_dims)]
        return jtu.tree_unflatten(treedef, full)

    def reduce(self, grads: PyTree) -> PyTree:
        leaves, treedef = jtu.tree_flatten(grads)
        out = [_reduce(g, d, self.axes) for g, d in zip(leaves, self.leaf_dims)]
        return jtu.tree_unflatten(treedef, out)

    def map(self, body: Callable, in_specs, out_specs) -> Callable:
        return jax.shard_map(
            body,
            mesh=self.mesh,
            in_specs=in_specs,
            out_specs=out_specs,
            check_vma=False,
        )


def _local_losses(batched_f, d, *local_batch):
    losses, _ = batched_f(d, *local_batch)
    local_size = batch_size(local_batch)
    if losses.ndim not in (1, 2) or losses.shape[0] != local_size:
        raise ValueError(
            "With `DataParallel`, the losses of a batch must have shape (B,) or "
            f"(B, T); got {losses.shape} on a local batch of {local_size}."
        )
    return losses


# Each piece of the step is jitted on its own (inlined under an outer `jit`): an
# eager step then reuses their compilations instead of re-tracing its `shard_map`s.
@eqx.filter_jit
def _gramian_part(layout, method, gram_spec, batched_f, diff, batch):
    def body(diff, *local_batch):
        full = layout.gather(diff)
        losses_of = ft.partial(_local_losses, batched_f)
        if method == "structured":
            nothing = jtu.tree_map(lambda _: None, full)
            losses, g, _ = structured_value_and_gramian(
                losses_of, full, nothing, gram_spec, local_batch, axis_name=layout.axes
            )
            return losses, g
        losses = losses_of(full, *local_batch)
        gram, rest = eqx.partition(lax.stop_gradient(full), gram_spec)
        vec = per_sample_vector_fn(lambda g, *b: batched_f(eqx.combine(g, rest), *b)[0])
        in_axes = (None,) + (0,) * len(local_batch)
        jac = jax.vmap(jax.jacrev(vec), in_axes=in_axes)(gram, *local_batch)
        rows = losses.size
        return losses, exchanged_gramian(
            flat_rows(jac, rows), layout.axes, losses.dtype
        )

    in_specs = (layout.param_specs(diff),) + (layout.rows,) * len(batch)
    losses, g = layout.map(body, in_specs, (layout.rows, P()))(diff, *batch)
    return losses, symmetrize(g)


@eqx.filter_jit
def _update_part(layout, batched_f, diff, cotangent, batch):
    def body(diff, cotangent, *local_batch):
        full = layout.gather(diff)
        _, vjp = jax.vjp(lambda d: _local_losses(batched_f, d, *local_batch), full)
        (grads,) = vjp(cotangent)
        return layout.reduce(grads)

    specs = layout.param_specs(diff)
    in_specs = (specs, layout.rows) + (layout.rows,) * len(batch)
    cotangent = _place(cotangent, layout.mesh, layout.rows)
    return layout.map(body, in_specs, specs)(diff, cotangent, *batch)


def _upgrad_weights(layout: _Layout, weighting: UPGradWeighting, g: Array) -> Array:
    """UPGrad's weights $\\sum_i p_i V_i$ with the $m$ lane QPs split over the
    devices: each solves its lanes, one `psum` adds up their contributions."""
    check_gramian(g)
    m, dtype = g.shape[0], g.dtype
    pref = pref_weights(weighting.pref_vector, m, dtype)
    if m == 0:
        return pref
    per_device = -(-m // layout.size)
    padded = per_device * layout.size
    # Padding lanes have u = 0, whose solution is 0; their coefficient is 0 too.
    lanes = jnp.eye(padded, m, dtype=dtype)
    coeffs = jnp.zeros((padded,), dtype).at[:m].set(jnp.maximum(pref, 0))
    dynamic, static = eqx.partition(weighting, eqx.is_array)

    def body(dynamic, g, lanes, coeffs):
        w = eqx.combine(dynamic, static)
        solution = w.projector.solve(g, lanes)
        failed = (solution.result != RESULTS.successful) & (
            solution.result != RESULTS.nonfinite
        )
        v, bad = solution.value, lax.stop_gradient(failed).astype(jnp.int32)
        weights, bad = lax.psum((coeffs @ v, bad), layout.axes)
        if w.projector.throw:
            # After the reduction, so that every device raises (or none does).
            failed = bad > 0
            result = RESULTS.where(failed, RESULTS.kkt_check_failed, RESULTS.successful)
            weights = result.error_if(weights, failed)
        return weights

    rows = layout.rows
    in_specs = (P(), P(), rows, rows)
    lanes, coeffs = _place((lanes, coeffs), layout.mesh, rows)
    return layout.map(body, in_specs, P())(dynamic, g, lanes, coeffs)


@eqx.filter_jit
def _weigh(layout, weighting, g, state, key):
    g, state, key = _place((g, state, key), layout.mesh, P())
    if isinstance(weighting, UPGradWeighting):
        return _upgrad_weights(layout, weighting, g), state
    # Every device computes the same weights from the same replicated Gramian: no
    # broadcast, and a failed check raises on every device at once.
    dynamic, static = eqx.partition(weighting, eqx.is_array)

    def body(dynamic, g, state, key):
        return weigh(eqx.combine(dynamic, static), g, state, key)

    return layout.map(body, P(), P())(dynamic, g, state, key)


class DataParallel(AbstractStrategy):
    r"""[`eqxjd.PerSampleGramian`][] with the batch split over a device mesh
    (data-parallel instance-wise Jacobian descent), on one process or many.

    The positional arguments of the step are split along `axis_name`; every device
    holds `B / D` samples (`D` devices in the whole mesh: other mesh axes, e.g. a
    `"model"` axis, split each share further). The Gramian comes from one of
    [`eqxjd.PerSampleGramian`][]'s two methods:

    - `method="structured"` (default): each device runs the forward and backward
      pass of its samples and keeps the structured Gramian's factors (the inputs and
      output cotangents of the layers that consume parameters). One `all_gather` of
      those factors, a few activations per sample, lets each device compute its
      `(B / D, B)` rows of $G$, and one more gathers the rows. Parameters whose
      per-sample gradients are formed instead go through the exchange below.
    - `method="gradients"`: each device computes the per-sample Jacobians of its
      samples; one `all_to_all` gives each device all `B` rows of `1 / D` of the
      Jacobian's columns, and one `psum` of the `(B, B)` partial Gramians gives $G$
      on every device.

    The weights are computed on every device from the replicated $G$; with
    [`eqxjd.UPGrad`][], the `B` lane QPs are split over the devices instead and one
    `psum` adds up their contributions. The update is each device's VJP of
    $\sum_{i \in d} w_i \ell_i$ (one more forward pass), summed over the devices.
    The result equals the single-device [`eqxjd.PerSampleGramian`][] step.

    **Parameters** keep their layout: a parameter sharded over the mesh (e.g.
    `P("model", None)`, FSDP-style) is gathered inside the step for the forward
    passes, and its update comes back with the same sharding (a reduce-scatter). The
    layout is read from the arrays (eagerly) or from their types (under `jit`, on a
    mesh with explicit axes, the default of `jax.make_mesh`); otherwise parameters
    are treated as replicated.

    **Across processes** (`jax.distributed.initialize`), the batch must be made of
    global arrays (`jax.make_array_from_process_local_data`); host-local arrays are
    rejected with a `ValueError`. See the multi-host guide.

    Call the step under `jax.jit` / `eqx.filter_jit`, or eagerly (each piece is
    compiled once). `has_aux=True` is not supported.
    """

    mesh: Mesh | None = eqx.field(default=None, static=True)
    axis_name: str | tuple[str, ...] = eqx.field(default="data", static=True)
    method: Literal["structured", "gradients"] = eqx.field(
        default="structured", static=True
    )

    # The losses' auxiliary output would need one more forward pass of the batch.
    returns_aux: ClassVar[bool] = False

    def __check_init__(self):
        _as_axes(self.axis_name)
        check_method(self.method)
        if self.mesh is not None:
            check_mesh_axis(self.mesh, self.axis_name)

    def linearize(self, f, diff, gram_spec, batch, batched_f) -> Linearized:
        layout = _layout(self.mesh, self.axis_name, diff)
        _check_global_batch(batch, layout.mesh)
        size = batch_size(batch)
        if size % layout.size:
            raise ValueError(
                f"The batch size {size} is not divisible by the {layout.size} "
                f"devices of the mesh (axes {layout.axes})."
            )
        diff = _place_params(diff, layout)
        batch = tuple(_place(b, layout.mesh, layout.rows) for b in batch)
        losses, g = _gramian_part(
            layout, self.method, gram_spec, batched_f, diff, batch
        )

        def vjp(cotangent):
            return _update_part(layout, batched_f, diff, cotangent, batch)

        def weigh_replicated(weighting, g, state, key):
            return _weigh(layout, weighting, g, state, key)

        return Linearized(losses, None, None, g, vjp, weigh_replicated)


def _layout(given: Mesh | None, axis_name: AxisNames, diff: PyTree) -> _Layout:
    mesh = _current_mesh(given)
    batch_axes = _as_axes(axis_name)
    check_mesh_axis(mesh, batch_axes)
    # The batch axes first: the rows of G follow the global order of the samples.
    axes = batch_axes + tuple(a for a in mesh.axis_names if a not in batch_axes)
    dims = tuple(_param_dims(x, mesh) for x in jtu.tree_leaves(diff))
    return _Layout(mesh, axes, dims)


def _place_params(diff: PyTree, layout: _Layout) -> PyTree:
    leaves, treedef = jtu.tree_flatten(diff)
    placed = [
        _place(x, layout.mesh, _spec(d)) for x, d in zip(leaves, layout.leaf_dims)
    ]
    return jtu.tree_unflatten(treedef, placed)


DataParallel.__init__.__doc__ = """**Arguments:**

- `mesh`: a `jax.sharding.Mesh`; `None` (default) uses the mesh set by
    `jax.set_mesh` when the step is called.
- `axis_name`: the mesh axis, or tuple of axes, that the batch is split over
    (default `"data"`). The batch size must be divisible by the number of devices of
    the whole mesh.
- `method`: `"structured"` (default) or `"gradients"`, see above.
"""
