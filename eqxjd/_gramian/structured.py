r"""The per-sample Gramian from one forward and one backward pass ("ghost Gramians").

For losses that decompose over a batch, the Gramian $G_{ij} = \langle g_i, g_j
\rangle$ of the per-sample gradients is a sum over parameter leaves, and each leaf's
gradient is a sum over the equations that consume it. For a dense layer $y = W a$
applied at positions $p$ of sample $i$, $g_i = \sum_p \delta_{ip} a_{ip}^\top$, so

$$G_{ij} = \sum_{p, q} (a_{ip} \cdot a_{jq})\,(\delta_{ip} \cdot \delta_{jq}),$$

which needs only the layer's inputs $a$ (kept by the forward pass) and output
cotangents $\delta$. Since samples are independent, the cotangent of sample $i$'s
output under the *summed* loss is sample $i$'s own, so one backward pass gives every
$\delta$. The weighted update $\sum_i w_i g_i$ needs no per-sample gradient either:
per equation, it is the weight-gradient product of a backward pass, at the same $a$
and the cotangents $w_i \delta_i$.

`taps.py` finds the equations and re-runs the jaxpr with them perturbed, `ghost.py`
holds the ghost factors of each kind of equation, and this module chooses, per leaf,
between the ghost form and per-sample gradients and assembles $G$ block by block.
"""

import dataclasses
import functools as ft
import math
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jax.extend.core import primitives as prims
from jaxtyping import Array, Float, PyTree

from .._checks import check_chunk_size, check_floating, check_losses
from .common import batch_size, exchanged_gramian, flat_rows, symmetrize
from .ghost import Ghost, ghost_block, ghost_of, gram, use_cost
from .per_sample import chunk_starts, per_sample_gramian, per_sample_vector_fn
from .taps import analyse, bind, over_levels, Plan, run, Tap


_HIGHEST = lax.Precision.HIGHEST


def structured_value_and_gramian(
    loss_fn: Callable[..., Array],
    diff: PyTree,
    static: PyTree,
    gram_spec: Any,
    batch: tuple[Any, ...],
    *,
    chunk_size: int | None = None,
    axis_name: tuple[str, ...] | None = None,
) -> tuple[Float[Array, "B ..."], Float[Array, "m m"], Callable[[Array], PyTree]]:
    r"""Per-sample losses, their Gramian and a VJP, from one forward pass.

    The losses are $\ell_i$ = `loss_fn(model, *batch)[i]` (a scalar, or `T` tasks, per
    sample). Their Gramian $G = J J^\top$, $J$ the Jacobian of `losses.ravel()` w.r.t.
    the leaves of `diff` selected by `gram_spec`, is computed without per-sample
    gradients where the structure allows it, and the update $\nabla \sum w \cdot
    \ell$ without a second backward pass. A whole instance-wise step then costs about
    one forward pass, one backward pass without weight gradients, the weight-gradient
    products of a backward pass, $G$ and the weighting.

    1. `loss_fn` on a batch of one sample (`x[None]`) is traced to a jaxpr, and every
       equation consuming a parameter (possibly through reshapes, transposes,
       squeezes, dtype conversions, slices or broadcasts) is found, also inside
       `jax.jit` / `eqx.filter_jit` calls, `jax.checkpoint` (evaluated in line) and
       `lax.scan` bodies (a parameter used at every step: the steps are positions; a
       parameter scanned over as `xs`: one slice per step).
    2. That jaxpr is re-run, `vmap`-ed over the samples, with each such equation's
       floating outputs perturbed by an added zero input and its other operands
       returned. One backward pass of the summed losses w.r.t. the perturbations
       gives each sample's output cotangents $\delta$ of those equations (one
       backward pass per task for `(B, T)` losses). A product whose only use is a
       following bias addition (a dense layer) shares that addition's cotangent.
    3. Per selected leaf, $G$'s contribution comes, whichever costs fewer flops:
        - from the ghost identity $G_{ij} = \sum_h \sum_{p,q} (a_{ihp} \cdot
          a_{jhq})(\delta_{ihp} \cdot \delta_{jhq})$ (cost $\sim B^2 P^2 (d_{in} +
          d_{out})$) for `dot_general` (dense layers, attention projections:
          positions are the free dimensions of the other operand, $h$ its batch
          dimensions), `conv_general_dilated` on a kernel (input patches as
          positions, feature groups as $h$) and row lookups (`gather` /
          `dynamic_slice` of whole rows, i.e. embeddings: $a_{ip} \cdot a_{jq}$ is a
          comparison of indices); a bias added right after such a product is a
          constant input feature 1 of the same term;
        - or from per-sample gradients of that leaf only (cost $\sim B P d_{in}
          d_{out} + B^2 d_{in} d_{out}$), `chunk_size` samples at a time, each from
          the captured operands and cotangents through the consuming equation's own
          VJP. This covers every other consuming equation (norm scales, elementwise
          operations, `jax.custom_jvp` / `jax.custom_vjp` calls, whose custom rules
          are used, not their primal's derivative; a scan whose carry holds a
          parameter, as a whole; ...).

       A leaf consumed by several equations (weight tying, a layer applied twice) is
       exact: its uses share one ghost term (positions concatenated) when they read
       it in the same layout and way, separate ones when they read disjoint parts of
       it (e.g. slices of a fused weight), and otherwise its per-sample gradient is
       the sum over all its uses.
    4. Leaves that no equation consumes in a tappable way (a parameter returned as a
       loss, or read by an equation with side effects) go through the generic
       per-sample path: per-sample Jacobians of just those leaves, chunked.

    The result equals $J J^\top$ of the full Jacobian, up to rounding.

    **Memory.** The operands and output cotangents of the tapped equations are kept
    for the whole batch (about what a forward pass keeps for its backward pass, once
    more per task). Per-sample gradients exist for `chunk_size` samples (two chunks)
    at a time, and ghost terms for `chunk_size` x `chunk_size` blocks. With
    `chunk_size=None`, every term's `B x B` intermediates may be alive at once.

    !!! warning "Batch independence"

        The per-sample losses are `loss_fn` on batches of one, `vmap`-ed: sample $i$'s
        loss must depend on sample $i$ alone (no BatchNorm in training mode, no
        batch statistics). A `loss_fn` that mixes samples gets the Gramian (and
        losses) of its batch-of-one version.

    **Arguments:**

    - `loss_fn`: `loss_fn(model, *batch)` -> losses of shape `(B,)` or `(B, T)`, with
        `model = eqx.combine(diff, static)`.
    - `diff`, `static`: `eqx.partition(model, eqx.is_inexact_array)`.
    - `gram_spec`: which leaves of `diff` enter the Gramian (partial Jacobian
        descent): a bool, or a pytree of bools / callables as in `eqx.partition`.
    - `batch`: a tuple of pytrees of arrays with a common leading axis `B`.
    - `chunk_size`: samples per chunk of per-sample quantities (blocks of the
        Gramian), or `None` for all at once. (Keyword only argument.)
    - `axis_name`: inside `shard_map`, the mesh axes that the batch is split over
        (each device holds `B / D` samples, in the order of the axes). The Gramian
        is then the global `(B T, B T)` one, on every device: the ghost factors of
        the local samples are gathered (`all_gather`, a few activations and
        cotangents per sample) and each device computes its rows of $G$; the
        per-sample gradients that are formed go through one `all_to_all` of their
        columns and one `psum`. `chunk_size` must be `None`; the losses and `vjp`
        stay local. (Keyword only argument.)

    **Returns:**

    A 3-tuple `(losses, gramian, vjp)`: `losses` of shape `(B,)` or `(B, T)`,
    `gramian` of shape `(B T, B T)` in the order of `losses.ravel()`, and
    `vjp(weights)`, which maps `weights` shaped like `losses` to the gradient of
    $\sum w \cdot \ell$ w.r.t. every leaf of `diff` (selected or not), shaped like
    `diff`, from the quantities already computed. Like the function returned by
    `jax.vjp`, call it under the same transformation (e.g. inside the same `jax.jit`).
    """
    check_chunk_size(chunk_size)
    if axis_name is not None and chunk_size is not None:
        raise ValueError("`chunk_size` is not supported with `axis_name`.")
    if not isinstance(batch, tuple):
        raise ValueError(
            f"`batch` must be a tuple of batched pytrees; got {type(batch).__name__}."
        )
    size = batch_size(batch)
    leaves, diff_def = jtu.tree_flatten(diff)
    selected = _selected(diff, gram_spec)
    sample_leaves, batch_def = jtu.tree_flatten(batch)
    per_sample = _per_sample_fn(loss_fn, diff_def, static, batch_def, len(leaves))
    closed = jax.make_jaxpr(per_sample)(
        *[jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves],
        *[jax.ShapeDtypeStruct(x.shape[1:], x.dtype) for x in sample_leaves],
    )
    out_aval = closed.out_avals[0]
    tasks = 1 if out_aval.ndim == 0 else out_aval.shape[0]
    dtype = out_aval.dtype

    # Every leaf is tracked, so that the update can come from the taps too; only the
    # selected ones enter the Gramian.
    plan = analyse(closed, [x.shape for x in leaves])
    plan = plan.without(plan.fallback)
    fallback = sorted(plan.fallback)
    zs = {
        path: tuple(_zeros(size, tap, k) for k in tap.perturbed)
        for path, tap in plan.taps.items()
        if tap.alias is None
    }

    def batched(own, zs_):
        full = list(leaves)
        for i, x in zip(fallback, own):
            full[i] = x

        def one(zs_i, *sample):
            outs, acts = run(closed, plan, [*full, *sample], zs_i)
            return outs[0], acts

        capture_axes = {p: tap.capture_axes() for p, tap in plan.taps.items()}
        return jax.vmap(one, out_axes=(0, capture_axes))(zs_, *sample_leaves)

    # One forward pass; the backward w.r.t. the perturbations gives the cotangents
    # (the leaves that could not be tapped are differentiated directly).
    own = [leaves[i] for i in fallback]
    losses, pullback, acts = jax.vjp(batched, own, zs, has_aux=True)
    deltas = _with_aliases(plan, _cotangents(pullback, losses))

    def vjp(weights: Float[Array, "B ..."]) -> PyTree:
        if jnp.shape(weights) != losses.shape:
            raise ValueError(
                f"The weights must have the shape of the losses, {losses.shape}; got "
                f"{jnp.shape(weights)}."
            )
        check_floating(weights, "weights")
        weights = jnp.asarray(weights).astype(losses.dtype)
        grads = _update(plan, leaves, acts, deltas, weights.reshape(size, tasks))
        if fallback:
            own_grads, _ = pullback(weights)
            grads.update(zip(fallback, own_grads))
        out = [grads.get(i, jnp.zeros_like(x)) for i, x in enumerate(leaves)]
        return jtu.tree_unflatten(diff_def, out)

    chunks = 1 if chunk_size is None else -(-size // min(chunk_size, size))
    # With `axis_name`, every device weighs the terms' costs for the whole batch.
    total = size if axis_name is None else size * lax.axis_size(axis_name)
    terms = _terms(plan, selected, leaves, total, tasks, chunks)
    chosen = [i for i in fallback if selected[i]]
    fallback_args = (loss_fn, leaves, diff_def, static, chosen, batch)
    if axis_name is not None:
        g = _exchanged(plan, terms, leaves, acts, deltas, size, tasks, dtype, axis_name)
        if chosen:
            rows = _fallback_rows(*fallback_args, tasks)
            g = g + exchanged_gramian(rows, axis_name, dtype)
        return losses, symmetrize(g), vjp
    g = _assemble(plan, terms, leaves, acts, deltas, size, tasks, dtype, chunk_size)
    if chosen:
        g = g + _fallback_gramian(*fallback_args, size, tasks, dtype, chunk_size)
    return losses, symmetrize(g), vjp


def _zeros(size: int, tap: Tap, k: int) -> Array:
    aval = tap.eqn.outvars[k].aval
    return jnp.zeros((size, *tap.levels, *aval.shape), aval.dtype)


# ------------------------------------------------------------------------- inputs


def _selected(diff: PyTree, gram_spec: Any) -> list[bool]:
    """Per leaf of `diff`: whether `gram_spec` selects it."""
    chosen, _ = eqx.partition(diff, gram_spec)
    is_none = lambda x: x is None
    pairs = zip(
        jtu.tree_leaves(diff, is_leaf=is_none), jtu.tree_leaves(chosen, is_leaf=is_none)
    )
    flags = [c is not None for d, c in pairs if d is not None]
    if not any(flags):
        raise ValueError(
            "`gram_spec` selects no floating-point leaf of `diff`: select at least one "
            "(a bool, or a pytree of bools / callables as in `eqx.partition`)."
        )
    return flags


def _per_sample_fn(loss_fn, diff_def, static, batch_def, nleaves: int) -> Callable:
    """`(*diff leaves, *sample leaves) -> ()` or `(T,)`: `loss_fn` on a batch of one."""

    def per_sample(*flat):
        model = eqx.combine(jtu.tree_unflatten(diff_def, flat[:nleaves]), static)
        sample = jtu.tree_unflatten(batch_def, flat[nleaves:])
        out = loss_fn(model, *jtu.tree_map(lambda x: x[None], sample))
        check_losses(out, "`loss_fn`")
        if out.ndim not in (1, 2) or out.shape[0] != 1:
            raise ValueError(
                "`loss_fn(model, *batch)` must return losses of shape (B,) or (B, T); "
                f"on a batch of one it returned shape {out.shape}."
            )
        return out[0]

    return per_sample


def _cotangents(pullback, losses: Array) -> dict:
    """Each perturbed tap's output cotangents, per sample and task: leaves
    `(B, T, ...)`. Samples are independent, so the cotangents of the summed losses
    are each sample's own; tasks need one backward pass each."""
    if losses.ndim == 1:
        _, dz = pullback(jnp.ones_like(losses))
        return jtu.tree_map(lambda x: x[:, None], dz)
    tasks = losses.shape[1]
    basis = jnp.eye(tasks, dtype=losses.dtype)[:, None, :]
    basis = jnp.broadcast_to(basis, (tasks, *losses.shape))
    return jax.vmap(lambda c: pullback(c)[1], out_axes=1)(basis)


def _with_aliases(plan: Plan, deltas: dict) -> dict:
    """Adds the cotangents of aliased taps, pulled back from their targets."""
    deltas = dict(deltas)

    def resolve(tap: Tap):
        if tap.path not in deltas:
            alias = tap.alias
            assert alias is not None  # a tap without its own cotangent is an alias
            (target,) = resolve(plan.taps[alias.target])
            lead = 2 + len(tap.levels)  # samples, tasks, scan steps
            for eqn in reversed(alias.chain):
                target = _unapply(eqn, target, lead)
            if alias.sign < 0:
                target = -target
            deltas[tap.path] = (target,)
        return deltas[tap.path]

    for tap in plan.taps.values():
        resolve(tap)
    return deltas


def _unapply(eqn, x, lead: int, xp=jnp):
    """The transpose of a reshape, squeeze or transpose on trailing axes (`xp`: `jnp`
    for arrays, `np` for index arrays)."""
    if eqn.primitive is prims.transpose_p:
        inverse = np.argsort(eqn.params["permutation"])
        return xp.transpose(
            x, tuple(range(lead)) + tuple(lead + int(d) for d in inverse)
        )
    return xp.reshape(x, x.shape[:lead] + tuple(eqn.invars[0].aval.shape))


def _update(plan: Plan, leaves: list, acts: dict, deltas: dict, weights: Array) -> dict:
    r"""$\sum_{i, t} w_{it} \nabla \ell_{it}$ for the tapped leaves: per tap, the VJP of
    the equation over the whole batch (one batched product for a dense layer) at the
    captured operands and the cotangents $\sum_t w_{it} \delta_{it}$."""
    grads: dict = {}
    samples = weights.shape[0]
    for tap in plan.taps.values():
        slots = [j for j in tap.slots if tap.view(j).leaf not in plan.fallback]
        if not slots:
            continue
        values, axes = _tap_args(tap, leaves, acts)
        positions = [tap.args().index(j) for j in slots]
        lifted = over_levels(tap, ft.partial(_step, tap, tap.eqn.params))

        def batched(
            ws,
            tap=tap,
            values=values,
            axes=axes,
            positions=positions,
            lifted=lifted,
            slots=slots,
        ):
            args = list(values)
            for position, j, w in zip(positions, slots, ws):
                args[position] = tap.view(j).value(w)
            return jax.vmap(lifted, in_axes=axes, axis_size=samples)(*args)

        own = [leaves[tap.view(j).leaf] for j in slots]
        _, pull = jax.vjp(batched, own)
        cot = tuple(_weighted(d, weights) for d in deltas[tap.path])
        (parts,) = pull(cot)
        for j, part in zip(slots, parts):
            leaf = tap.view(j).leaf
            grads[leaf] = part if leaf not in grads else grads[leaf] + part
    return grads


def _weighted(delta: Array, weights: Array) -> Array:
    r"""$\sum_t w_{it} \delta_{it}$: `(B, T, ...)` -> `(B, ...)`."""
    w = weights.astype(delta.dtype).reshape(weights.shape + (1,) * (delta.ndim - 2))
    return jnp.sum(delta * w, axis=1)


def _step(tap: Tap, params: dict, *args) -> tuple:
    """The tap's equation at one scan step: its perturbed outputs."""
    outs = bind(tap.eqn, tap.operands(args), params)
    return tuple(outs[k] for k in tap.perturbed)


# ------------------------------------------------------------------------- terms


@dataclasses.dataclass(frozen=True, eq=False)
class _GhostGroup:
    """Uses of one leaf read in the same layout: their positions are concatenated.
    With `ones`, a constant input feature 1 stands for a bias added to the output."""

    index: bool
    uses: tuple[tuple[Tap, int, Ghost], ...]
    ones: bool = False


@dataclasses.dataclass(frozen=True, eq=False)
class _Rows:
    """A leaf whose per-sample gradients are formed, from all its uses."""

    leaf: int
    uses: tuple[tuple[Tap, int], ...]


def _terms(
    plan: Plan, selected: list, leaves: list, size: int, tasks: int, chunks: int
) -> list:
    uses = defaultdict(list)
    for tap in plan.taps.values():
        for slot in tap.slots:
            leaf = tap.view(slot).leaf
            if selected[leaf] and leaf not in plan.fallback:
                uses[leaf].append((tap, slot))
    terms = []
    for leaf, leaf_uses in uses.items():
        groups = _ghost_groups(leaf_uses)
        numel = math.prod(leaves[leaf].shape)
        # Per-sample gradients: each sample's VJPs (chunk b recomputed for each chunk
        # a <= b), then the inner products.
        rows_cost = size * tasks * sum(use_cost(t) + numel for t, _ in leaf_uses)
        rows_cost = rows_cost * (chunks + 1) / 2 + (size * tasks) ** 2 * numel
        if groups is not None:
            ghost_cost = size**2 * sum(_ghost_cost(g, tasks) for g in groups)
            if _prefer_ghost(float(ghost_cost), float(rows_cost)):
                terms.extend(groups)
                continue
        terms.append(_Rows(leaf, tuple(leaf_uses)))
    return _fold_biases(terms)


def _fold_biases(terms: list) -> list:
    r"""Folds each bias added right after a ghost product (see `Alias`) into that
    product's term: with $g^b_i = \sum_p d_{ip}$, $G^W + G^b = \sum_{p, q}
    (a_{ip} \cdot a_{jq} + 1)(d_{ip} \cdot d_{jq})$, one term instead of two. A layer
    applied several times folds its bias if each of the bias's additions follows one
    of the product's uses."""
    owner = {}  # addition path -> (group, the product's use aliased to it)
    for term in terms:
        if isinstance(term, _GhostGroup) and not term.index:
            for use in term.uses:
                if use[0].alias is not None:
                    owner[use[0].alias.target] = (term, use)
    folded: dict = {}
    out = []
    for term in terms:
        if isinstance(term, _Rows):
            maybe = [owner.get(tap.path) for tap, _ in term.uses]
            found = [f for f in maybe if f is not None]
            if len(found) == len(maybe):
                group = found[0][0]
                if (
                    id(group) not in folded
                    and all(f[0] is group for f in found)
                    and len({id(f[1]) for f in found}) == len(group.uses)
                    and len(term.uses) == len(group.uses)
                    and all(
                        _is_bias(f[1], tap, slot)
                        for f, (tap, slot) in zip(found, term.uses)
                    )
                ):
                    folded[id(group)] = dataclasses.replace(group, ones=True)
                    continue
        out.append(term)
    return [folded.get(id(t), t) for t in out]


def _is_bias(use: tuple[Tap, int, Ghost], add: Tap, slot: int) -> bool:
    r"""Whether `add`'s operand `slot` adds bias entry $\pi(n)$ to every output entry
    of feature $n$ of the product `use`, for a permutation $\pi$ (so that its
    per-sample gradient is $\sum_p d_{ip}$ up to a permutation)."""
    tap, w_slot, ghost = use
    view = add.view(slot)
    if (
        ghost.h != 1
        or ghost.cot_layout is None
        or view.stack_levels
        or tap.view(w_slot).stack_levels
    ):
        return False
    shape = add.eqn.outvars[0].aval.shape
    try:
        index = np.broadcast_to(view.index(), shape)
    except ValueError:
        return False
    assert tap.alias is not None
    for eqn in reversed(tap.alias.chain):
        index = _unapply(eqn, index, 0, np)
    index = ghost.cot_layout(index)
    first = index[0, 0]
    return bool(np.all(index == first)) and sorted(first.tolist()) == list(
        range(math.prod(view.leaf_shape))
    )


def _prefer_ghost(ghost_cost: float, rows_cost: float) -> bool:
    # One function, so that tests can force either form.
    return ghost_cost <= rows_cost


def _ghost_cost(group: _GhostGroup, tasks: int) -> int:
    _, _, ghost = group.uses[0]
    p = sum(_positions(tap, slot, g) for tap, slot, g in group.uses)
    h = ghost.h * _stacked(*group.uses[0][:2])
    k = 1 if group.index else ghost.k + group.ones
    return h * p * p * (k + tasks * tasks * (ghost.n + 1))


def _stacked(tap: Tap, slot: int) -> int:
    """Steps folded into H (scans over the parameter)."""
    levels = tap.view(slot).stack_levels
    return math.prod(n for d, n in enumerate(tap.levels) if d in levels)


def _positions(tap: Tap, slot: int, ghost: Ghost) -> int:
    """Positions per sample: the ghost's, times the steps of scans that reuse it."""
    levels = tap.view(slot).stack_levels
    return ghost.p * math.prod(n for d, n in enumerate(tap.levels) if d not in levels)


# Entries of a leaf beyond which the layouts of its uses are not compared entry by
# entry (the uses then need identical descriptions to share a ghost term).
_LAYOUT_LIMIT = 1 << 22


def _ghost_groups(uses: list) -> list[_GhostGroup] | None:
    """The uses of one leaf as ghost groups, or None if some use has no ghost form or
    two uses read overlapping parts of the leaf in different layouts."""
    maybe = [ghost_of(tap, slot) for tap, slot in uses]
    ghosts = [g for g in maybe if g is not None]
    if len(ghosts) < len(maybe):
        return None
    entries = [(tap, slot, ghost) for (tap, slot), ghost in zip(uses, ghosts)]
    if len({_description(*entry) for entry in entries}) == 1:
        # Same view of the leaf, read the same way (a layer applied several times):
        # the layouts are equal, the positions are concatenated.
        return [_GhostGroup(ghosts[0].index, tuple(entries))]
    view = uses[0][0].view(uses[0][1])
    if math.prod(view.leaf_shape) > _LAYOUT_LIMIT:
        return None
    keyed: dict = {}
    for tap, slot, ghost in entries:
        view = tap.view(slot)
        layout = ghost.layout(view.index(), view.nstack)
        layout = layout.reshape((-1,) + layout.shape[-2:])
        key = (ghost.index, layout.shape, layout.tobytes())
        keyed.setdefault(key, (layout, []))[1].append((tap, slot, ghost))
    # Groups reading disjoint parts of the leaf (e.g. slices of a fused weight) have
    # no cross terms; overlapping ones in different layouts would.
    seen = np.zeros(math.prod(view.leaf_shape), bool)
    for layout, _ in keyed.values():
        if np.any(seen[layout.ravel()]):
            return None
        seen[layout.ravel()] = True
    return [_GhostGroup(key[0], tuple(group)) for key, (_, group) in keyed.items()]


def _description(tap: Tap, slot: int, ghost: Ghost) -> tuple:
    """What determines a use's layout: the view's steps and the consuming equation,
    as seen from the parameter's side."""
    view = tap.view(slot)
    steps = tuple(
        step if step == "stack" else (str(step[0].primitive), repr(step[0].params))
        for step in view.steps
    )
    eqn = tap.eqn
    return (
        ghost.index,
        view.stack_levels,
        steps,
        str(eqn.primitive),
        repr(eqn.params),
        slot,
        tuple(eqn.invars[slot].aval.shape),
    )


# ------------------------------------------------------------------------- factors


def _tap_args(tap: Tap, leaves: list, acts: dict) -> tuple[list, tuple]:
    """Values of `tap.args()` for a chunk of samples, and their vmap axes (captured
    operands are per sample; views are the same for every sample)."""
    captured = iter(zip(acts[tap.path], tap.capture_axes()))
    values, axes = [], []
    for j in tap.args():
        view = tap.views[j]
        if view is None:
            value, axis = next(captured)
            values.append(value)
            axes.append(axis)
        else:
            values.append(view.value(leaves[view.leaf]))
            axes.append(None)
    return values, tuple(axes)


def _merge(xs_levels: tuple[int, ...], depth: int, out: Array) -> Array:
    """Folds the stacked axis 0 of a factor `(L, H, P, ...)` into H (a scan over the
    parameter: each step reads its own slice) or into P (a scan reusing it)."""
    if depth in xs_levels:
        return out.reshape((out.shape[0] * out.shape[1],) + out.shape[2:])
    out = jnp.moveaxis(out, 0, 1)
    return out.reshape((out.shape[0], out.shape[1] * out.shape[2]) + out.shape[3:])


def _group_factors(
    group: _GhostGroup, leaves, acts, deltas, dtype
) -> tuple[Array, Array]:
    """`(c, H, P, K)` (or `(c, H, P)` rows) and `(c, T, H, P, N)` for a chunk."""
    act_parts, cot_parts = [], []
    for tap, slot, ghost in group.uses:
        values, axes = _tap_args(tap, leaves, acts)
        merge = ft.partial(_merge, tap.view(slot).stack_levels)

        def act_step(*args, tap=tap, ghost=ghost):
            return ghost.act(tap.operands(args))

        def cot_step(*args, tap=tap, ghost=ghost):
            return ghost.cot(tap.operands(args[:-1]), args[-1])

        act = over_levels(tap, act_step, merge)
        cot = over_levels(tap, cot_step, merge, extra=1)
        (delta,) = deltas[tap.path]
        per_task = jax.vmap(cot, in_axes=(None,) * len(values) + (0,))
        # axis_size: the operands may all be shared (a parameter times a constant).
        samples = delta.shape[0]
        act_parts.append(jax.vmap(act, in_axes=axes, axis_size=samples)(*values))
        cot_parts.append(jax.vmap(per_task, in_axes=axes + (0,))(*values, delta))
    if len(group.uses) == 1:
        return act_parts[0], cot_parts[0]
    if not group.index:  # uses may differ in precision
        act_parts = [a.astype(dtype) for a in act_parts]
    cot_parts = [d.astype(dtype) for d in cot_parts]
    return jnp.concatenate(act_parts, axis=2), jnp.concatenate(cot_parts, axis=3)


def _precise(eqn) -> dict:
    """The equation's parameters, with the highest matmul precision where it has
    one (per-sample gradients should be as accurate as the ghost terms)."""
    params = dict(eqn.params)
    if eqn.primitive in (prims.dot_general_p, prims.conv_general_dilated_p):
        if params.get("precision") is None:
            params["precision"] = (_HIGHEST, _HIGHEST)
    return params


def _leaf_rows(term: _Rows, leaves, acts, deltas, rows: int) -> Array:
    """Per-sample gradients of one leaf for a chunk, `(c T, numel)`: the sum over its
    uses of the VJP of the consuming equation w.r.t. the leaf, at the captured
    operands and each sample's (and task's) output cotangents."""
    leaf = leaves[term.leaf]
    total = None
    for tap, slot in term.uses:
        values, axes = _tap_args(tap, leaves, acts)
        position = tap.args().index(slot)
        view = tap.view(slot)
        lifted = over_levels(tap, ft.partial(_step, tap, _precise(tap.eqn)))

        def per_sample(*args, lifted=lifted, view=view, position=position):
            args, delta = list(args[:-1]), args[-1]

            def of_leaf(w):
                args[position] = view.value(w)
                return lifted(*args)

            _, pull = jax.vjp(of_leaf, leaf)
            return jax.vmap(lambda d: pull(d)[0])(delta)

        g = jax.vmap(per_sample, in_axes=axes + (0,))(*values, deltas[tap.path])
        total = g if total is None else total + g
    assert total is not None
    return jnp.reshape(total, (rows, -1))


# ------------------------------------------------------------------------- blocks


def _assemble(
    plan: Plan,
    terms: list,
    leaves: list,
    acts: dict,
    deltas: dict,
    size: int,
    tasks: int,
    dtype,
    chunk_size: int | None,
) -> Array:
    ghosts = [t for t in terms if isinstance(t, _GhostGroup)]

    def factors(start, c: int):
        return _factors(plan, terms, leaves, acts, deltas, size, tasks, dtype, start, c)

    def block(x, y) -> Array:
        (gx, mx), (gy, my) = x, y
        parts = _ghost_parts(ghosts, gx, gy, dtype)
        # One product per leaf: concatenating the leaves first would copy them.
        parts += [_gram_rows(a, b) for a, b in zip(mx, my)]
        return ft.reduce(jnp.add, parts)

    if not terms:
        return jnp.zeros((size * tasks,) * 2, dtype)
    if chunk_size is None or chunk_size >= size:
        x = factors(0, size)
        return block(x, x)
    c = chunk_size
    starts = chunk_starts(size, c)
    k = starts.shape[0]

    def outer(a, g):
        x = factors(starts[a], c)
        row = starts[a] * tasks
        g = lax.dynamic_update_slice(g, block(x, x), (row, row))

        def inner(b, g):
            col = starts[b] * tasks
            blk = block(x, factors(starts[b], c))
            g = lax.dynamic_update_slice(g, blk, (row, col))
            return lax.dynamic_update_slice(g, blk.T, (col, row))

        return lax.fori_loop(a + 1, k, inner, g)

    return lax.fori_loop(0, k, outer, jnp.zeros((size * tasks,) * 2, dtype))


def _factors(
    plan, terms, leaves, acts, deltas, size, tasks, dtype, start, c: int
) -> tuple:
    """The terms' factors for samples `[start, start + c)` of `size`: ghost factors
    per ghost group, per-sample gradient rows `(c T, numel)` per formed leaf."""
    if c == size:
        acts_c, deltas_c = acts, deltas
    else:
        take = lambda x: lax.dynamic_slice_in_dim(x, start, c)
        acts_c = {
            path: tuple(
                x if axis is None else take(x)
                for x, axis in zip(values, plan.taps[path].capture_axes())
            )
            for path, values in acts.items()
        }
        deltas_c = jtu.tree_map(take, deltas)
    ghost = [
        _group_factors(t, leaves, acts_c, deltas_c, dtype)
        for t in terms
        if isinstance(t, _GhostGroup)
    ]
    rows = [
        _leaf_rows(t, leaves, acts_c, deltas_c, c * tasks).astype(dtype)
        for t in terms
        if isinstance(t, _Rows)
    ]
    return ghost, rows


def _ghost_parts(ghosts: list, left: list, right: list, dtype) -> list[Array]:
    return [
        ghost_block(t.index, t.ones, fx, fy, dtype=dtype)
        for t, fx, fy in zip(ghosts, left, right)
    ]


def _exchanged(plan, terms, leaves, acts, deltas, size, tasks, dtype, axes) -> Array:
    """The global Gramian of the terms, inside `shard_map` over `axes`: each device
    computes its rows of the ghost terms against the gathered factors of all samples
    (one `all_gather` of the factors, one of the rows), and the formed per-sample
    gradients go through `exchanged_gramian`."""
    total = size * lax.axis_size(axes) * tasks
    ghosts = [t for t in terms if isinstance(t, _GhostGroup)]
    g = jnp.zeros((total, total), dtype)
    if not terms:
        return g
    mine, rows = _factors(
        plan, terms, leaves, acts, deltas, size, tasks, dtype, 0, size
    )
    if ghosts:
        every = jtu.tree_map(lambda x: lax.all_gather(x, axes, tiled=True), mine)
        part = ft.reduce(jnp.add, _ghost_parts(ghosts, mine, every, dtype))
        g = lax.all_gather(part, axes, tiled=True)
    if rows:
        g = g + exchanged_gramian(rows, axes, dtype)
    return g


def _gram_rows(a: Array, b: Array) -> Array:
    return gram(a) if a is b else jnp.matmul(a, b.T, precision=_HIGHEST)


def _fallback_fn(loss_fn, leaves, diff_def, static, fallback) -> tuple:
    """The per-sample loss of the leaves that could not be tapped, and those leaves."""
    chosen = set(fallback)
    own = [x if i in chosen else None for i, x in enumerate(leaves)]
    rest = [None if i in chosen else x for i, x in enumerate(leaves)]
    own_tree = lax.stop_gradient(jtu.tree_unflatten(diff_def, own))
    rest_tree = lax.stop_gradient(jtu.tree_unflatten(diff_def, rest))

    def own_loss(own, *batch):
        return loss_fn(eqx.combine(own, rest_tree, static), *batch)

    return per_sample_vector_fn(own_loss), own_tree


def _fallback_gramian(
    loss_fn, leaves, diff_def, static, fallback, batch, size, tasks, dtype, chunk_size
) -> Array:
    """The Gramian of the leaves that could not be tapped, from per-sample Jacobians
    of those leaves only."""
    vec, own = _fallback_fn(loss_fn, leaves, diff_def, static, fallback)
    return per_sample_gramian(vec, own, batch, size, tasks, dtype, chunk_size)


def _fallback_rows(
    loss_fn, leaves, diff_def, static, fallback, batch, tasks
) -> list[Array]:
    """The per-sample Jacobian rows of the leaves that could not be tapped."""
    vec, own = _fallback_fn(loss_fn, leaves, diff_def, static, fallback)
    in_axes = (None,) + (0,) * len(batch)
    jac = jax.vmap(jax.jacrev(vec), in_axes=in_axes)(own, *batch)
    return flat_rows(jac, batch_size(batch) * tasks)
