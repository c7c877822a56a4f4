"""Where the parameters enter a per-sample loss: a walk over its jaxpr that finds the
equations consuming parameters ("taps"), and an interpreter that re-runs the jaxpr with
each tap's outputs perturbed by an added zero input and its operands returned.

The gradient of the summed (vmapped) losses w.r.t. a tap's perturbation is each
sample's own cotangent of that tap's outputs; with the captured operands, this gives
every sample's gradient contribution of that equation, exactly (see `structured.py`).
"""

import dataclasses
import functools as ft
import math
from typing import Any

import jax
import jax.lax as lax
import numpy as np
from jax.extend import core as jex
from jax.extend.core import primitives as prims


# Unary operations that only move, select or relabel the entries of a parameter: a
# parameter seen through them is still "the parameter" (a view), whose gradient is the
# view's gradient mapped back by the transposed operations.
_STRUCTURAL = frozenset(
    {
        prims.broadcast_in_dim_p,
        prims.convert_element_type_p,
        prims.copy_p,
        prims.reshape_p,
        prims.slice_p,
        prims.squeeze_p,
        prims.transpose_p,
    }
)

# Calls whose body is evaluated in line (same values, same derivatives): taps inside
# them are found and perturbed like top-level ones.
_INLINE = frozenset({prims.jit_p, prims.closed_call_p, prims.remat_p})

Path = tuple[int, ...]


def _is_literal(v: Any) -> bool:
    return isinstance(v, jex.Literal)


def _is_float(aval: Any) -> bool:
    return np.issubdtype(aval.dtype, np.inexact)


def _sub_jaxpr(eqn: Any) -> tuple[Any, list]:
    """The body of an in-line call as (open jaxpr, consts)."""
    params = eqn.params
    body = params["jaxpr"] if "jaxpr" in params else params["call_jaxpr"]
    if isinstance(body, jex.ClosedJaxpr):
        return body.jaxpr, list(body.consts)
    return body, []


def bind(eqn: Any, operands: list, params: dict | None = None) -> list:
    """Applies `eqn`'s primitive to `operands` (always a list of outputs)."""
    bind_params = eqn.primitive.get_bind_params(
        eqn.params if params is None else params
    )
    out = eqn.primitive.bind(*operands, **bind_params)
    return list(out) if eqn.primitive.multiple_results else [out]


# ------------------------------------------------------------------------- views


@dataclasses.dataclass(frozen=True, eq=False)
class View:
    """A parameter leaf seen through structural operations.

    `steps` replays them: `(eqn, nstack)` applies `eqn` under `nstack` vmaps (the
    leading axes stacked by enclosing scans), `"stack"` marks the leaf passed to a scan
    as `xs` (its leading axis becomes one step per scan iteration). `stack_levels` are
    the scan depths at which that happened, outermost first.
    """

    leaf: int
    leaf_shape: tuple[int, ...]
    steps: tuple = ()
    stack_levels: tuple[int, ...] = ()
    # Whether distinct entries of the view are distinct entries of the leaf (then inner
    # products of gradients are the same on the view and on the leaf).
    injective: bool = True

    @property
    def nstack(self) -> int:
        return len(self.stack_levels)

    def then(self, eqn: Any):
        injective = self.injective
        if eqn.primitive is prims.broadcast_in_dim_p:
            sizes = (eqn.invars[0].aval.shape, eqn.outvars[0].aval.shape)
            injective = injective and math.prod(sizes[0]) == math.prod(sizes[1])
        return dataclasses.replace(
            self, steps=self.steps + ((eqn, self.nstack),), injective=injective
        )

    def stacked(self, level: int):
        return dataclasses.replace(
            self,
            steps=self.steps + ("stack",),
            stack_levels=self.stack_levels + (level,),
        )

    def value(self, leaf: Any) -> Any:
        """The view of the leaf value `leaf` (stacked axes first)."""
        for step in self.steps:
            if step == "stack":
                continue
            eqn, nstack = step
            fn = lambda x, eqn=eqn: bind(eqn, [x])[0]
            for _ in range(nstack):
                fn = jax.vmap(fn)
            leaf = fn(leaf)
        return leaf

    def index(self) -> np.ndarray:
        """The flat leaf index of every entry of the view (stacked axes first)."""
        out = np.arange(math.prod(self.leaf_shape)).reshape(self.leaf_shape)
        for step in self.steps:
            if step != "stack":
                out = _index_step(out, *step)
        return out


def _index_step(index: np.ndarray, eqn: Any, lead: int) -> np.ndarray:
    """`eqn` applied to an index array with `lead` stacked leading axes."""
    prim, params = eqn.primitive, eqn.params
    stack = index.shape[:lead]
    if prim is prims.reshape_p:
        return index.reshape(stack + tuple(params["new_sizes"]))
    if prim is prims.transpose_p:
        perm = tuple(range(lead)) + tuple(lead + p for p in params["permutation"])
        return index.transpose(perm)
    if prim is prims.squeeze_p:
        return np.squeeze(index, tuple(lead + d for d in params["dimensions"]))
    if prim is prims.slice_p:
        strides = params["strides"] or (1,) * len(params["start_indices"])
        item = tuple(
            slice(a, b, s)
            for a, b, s in zip(
                params["start_indices"], params["limit_indices"], strides
            )
        )
        return index[(slice(None),) * lead + item]
    if prim is prims.broadcast_in_dim_p:
        shape, dims = tuple(params["shape"]), tuple(params["broadcast_dimensions"])
        expanded = [1] * len(shape)
        for i, d in enumerate(dims):
            expanded[d] = index.shape[lead + i]
        return np.broadcast_to(index.reshape(stack + tuple(expanded)), stack + shape)
    return index  # dtype conversions and copies keep every entry in place


def _structural_ok(eqn: Any, views: tuple) -> bool:
    if len(eqn.invars) != 1 or views[0] is None:
        return False
    if eqn.primitive is prims.reshape_p and eqn.params.get("dimensions") is not None:
        return False  # a reshape that also transposes
    # A conversion to integers ends the view (no gradient flows back through it).
    return _is_float(eqn.outvars[0].aval)


# ------------------------------------------------------------------------- the walk


@dataclasses.dataclass(frozen=True, eq=False)
class Alias:
    """A tap's only output reaches a tapped addition unchanged (through transposes and
    reshapes) and goes nowhere else, e.g. a dense layer's product and its bias: its
    cotangent is the addition's (times `sign`), pulled back through `chain`, so it
    needs no perturbation of its own."""

    target: Path
    chain: tuple
    sign: int


@dataclasses.dataclass(frozen=True, eq=False)
class Tap:
    """An equation consuming at least one parameter view.

    `levels` are the lengths of the enclosing scans (outermost first): the
    perturbations and captured operands of a tap inside scans are stacked over them.
    `captured` are the operands recorded (not literals, not views), per sample except
    where `shared` (they depend neither on the sample nor on a perturbation, e.g. a
    constant table: recorded once); `perturbed` the floating outputs, which carry the
    perturbations unless `alias` gives their cotangent.
    """

    path: Path
    eqn: Any
    levels: tuple[int, ...]
    views: tuple[View | None, ...]
    captured: tuple[int, ...]
    shared: tuple[bool, ...]
    perturbed: tuple[int, ...]
    alias: Alias | None = None

    def capture_axes(self) -> tuple[int | None, ...]:
        """The sample axis of each captured operand (None where shared)."""
        return tuple(None if s else 0 for s in self.shared)

    def view(self, slot: int) -> View:
        """The parameter view read as operand `slot` (one of `slots`)."""
        view = self.views[slot]
        assert view is not None
        return view

    @property
    def slots(self) -> tuple[int, ...]:
        return tuple(j for j, v in enumerate(self.views) if v is not None)

    def args(self) -> tuple[int, ...]:
        """The operands passed to per-step functions: views and captured ones."""
        return tuple(j for j, v in enumerate(self.eqn.invars) if not _is_literal(v))

    def level_axes(self, depth: int) -> tuple[int | None, ...]:
        """vmap axes of `args()` at scan depth `depth`: captured operands are stacked
        at every depth, views only where they were passed as `xs`."""
        axes = []
        for j in self.args():
            view = self.views[j]
            stacked = view is None or depth in view.stack_levels
            axes.append(0 if stacked else None)
        return tuple(axes)

    def operands(self, args: tuple) -> list:
        """The full operand list from `args()` values (literals filled in)."""
        values = iter(args)
        return [v.val if _is_literal(v) else next(values) for v in self.eqn.invars]


@dataclasses.dataclass
class Plan:
    taps: dict = dataclasses.field(default_factory=dict)  # path -> Tap
    inline: set = dataclasses.field(default_factory=set)  # paths of in-line calls
    scans: set = dataclasses.field(default_factory=set)  # paths of scans entered
    fallback: set = dataclasses.field(default_factory=set)  # leaf indices

    def merge(self, other) -> None:
        self.taps.update(other.taps)
        self.inline |= other.inline
        self.scans |= other.scans
        self.fallback |= other.fallback

    def without(self, leaves: set):
        """The plan with the uses of `leaves` dropped (taps left without uses go)."""
        taps = {}
        for path, tap in self.taps.items():
            views = tuple(
                None if v is not None and v.leaf in leaves else v for v in tap.views
            )
            if any(v is not None for v in views):
                taps[path] = tap
        for path, tap in taps.items():
            if tap.alias is not None and tap.alias.target not in taps:
                taps[path] = dataclasses.replace(tap, alias=None)
        return Plan(taps, self.inline, self.scans, self.fallback | set(leaves))


def analyse(closed: Any, leaf_shapes: list[tuple[int, ...] | None]) -> Plan:
    """The taps of `closed`, whose first inputs are the parameter leaves (`None` for
    leaves not tracked, e.g. outside the Gramian)."""
    views = [
        None if shape is None else View(i, shape) for i, shape in enumerate(leaf_shapes)
    ]
    samples = len(closed.jaxpr.invars) - len(views)
    views += [None] * samples
    per_sample = [False] * len(leaf_shapes) + [True] * samples
    plan = Plan()
    outs, _ = _walk(closed.jaxpr, views, per_sample, (), (), plan)
    # A parameter that is itself an output (through views only) has no equation to tap.
    plan.fallback |= {v.leaf for v in outs if v is not None}
    return plan


def _walk(
    jaxpr: Any, in_views: list, in_batched: list, path: Path, levels: tuple, plan: Plan
) -> tuple[list, list]:
    """Finds the taps of `jaxpr` given which inputs are parameter views and which are
    batched (may depend on the sample or on a perturbation); returns the same for its
    outputs. "Batched" may over-approximate (then a shared value is recorded per
    sample), never under-approximate (the interpreter's vmap relies on it)."""
    env = {v: w for v, w in zip(jaxpr.invars, in_views) if w is not None}
    batched = {v for v, b in zip(jaxpr.invars, in_batched) if b}

    def is_batched(v):
        return not _is_literal(v) and v in batched

    for i, eqn in enumerate(jaxpr.eqns):
        views = tuple(None if _is_literal(v) else env.get(v) for v in eqn.invars)
        some_batched = any(is_batched(v) for v in eqn.invars)
        here = path + (i,)
        outs_batched = _walk_eqn(
            eqn, views, some_batched, is_batched, here, levels, plan, env
        )
        batched.update(v for v, b in zip(eqn.outvars, outs_batched) if b)
    _find_aliases(jaxpr, path, plan)
    outs = [None if _is_literal(v) else env.get(v) for v in jaxpr.outvars]
    return outs, [is_batched(v) for v in jaxpr.outvars]


def _walk_eqn(eqn, views, some_batched, is_batched, here, levels, plan, env) -> list:
    """Records what `eqn` does with parameter views; returns whether each of its
    outputs is batched."""
    unchanged = [some_batched] * len(eqn.outvars)
    if all(w is None for w in views):
        return unchanged
    prim = eqn.primitive
    if prim in _STRUCTURAL and _structural_ok(eqn, views):
        env[eqn.outvars[0]] = views[0].then(eqn)
        return unchanged
    if prim in _INLINE:
        body, _ = _sub_jaxpr(eqn)
        in_batched = [is_batched(v) for v in eqn.invars]
        outs, outs_batched = _walk(body, list(views), in_batched, here, levels, plan)
        plan.inline.add(here)
        env.update({v: w for v, w in zip(eqn.outvars, outs) if w is not None})
        return outs_batched
    if prim is prims.scan_p:
        in_batched = [is_batched(v) for v in eqn.invars]
        if _walk_scan(eqn, views, in_batched, here, levels, plan):
            return [True] * len(eqn.outvars)
    perturbed = tuple(k for k, v in enumerate(eqn.outvars) if _is_float(v.aval))
    if not perturbed:
        return unchanged  # no gradient flows back through integer or boolean outputs
    if eqn.effects:
        # Re-running an effectful equation per sample would repeat its effects.
        plan.fallback |= {w.leaf for w in views if w is not None}
        return unchanged
    captured = tuple(
        j for j, v in enumerate(eqn.invars) if not _is_literal(v) and views[j] is None
    )
    shared = tuple(not is_batched(eqn.invars[j]) for j in captured)
    plan.taps[here] = Tap(here, eqn, levels, views, captured, shared, perturbed)
    return [True] * len(eqn.outvars)  # the perturbations are per sample


_PASS = frozenset({prims.reshape_p, prims.squeeze_p, prims.transpose_p})
_ADD = frozenset({prims.add_p, prims.sub_p})


def _find_aliases(jaxpr: Any, path: Path, plan: Plan) -> None:
    """Sets `Tap.alias` for the taps of this jaxpr (not nested ones) whose output only
    feeds a tapped addition (see `Alias`)."""
    consumers: dict = {}
    for i, eqn in enumerate(jaxpr.eqns):
        for v in eqn.invars:
            if not _is_literal(v):
                consumers.setdefault(v, []).append(i)
    outputs = {v for v in jaxpr.outvars if not _is_literal(v)}
    for i, eqn in enumerate(jaxpr.eqns):
        tap = plan.taps.get(path + (i,))
        if tap is None or len(eqn.outvars) != 1 or tap.perturbed != (0,):
            continue
        var, chain = eqn.outvars[0], []
        while var not in outputs and len(consumers.get(var, ())) == 1:
            j = consumers[var][0]
            user = jaxpr.eqns[j]
            if user.primitive in _PASS and len(user.invars) == 1:
                if not _structural_ok(user, (True,)):
                    break
                chain.append(user)
                var = user.outvars[0]
                continue
            if (
                user.primitive in _ADD
                and path + (j,) in plan.taps
                and user.outvars[0].aval.shape == var.aval.shape
            ):
                minus = user.primitive is prims.sub_p and user.invars[1] is var
                sign = -1 if minus else 1
                alias = Alias(path + (j,), tuple(chain), sign)
                plan.taps[path + (i,)] = dataclasses.replace(tap, alias=alias)
            break


def _walk_scan(
    eqn: Any, views: tuple, in_batched: list, path: Path, levels: tuple, plan: Plan
) -> bool:
    """Enters a scan whose parameters are constants (the same at every step: steps
    are positions) or `xs` (one slice per step); returns False, to tap the scan as a
    whole, if a parameter is in the carry or leaves the body."""
    params = eqn.params
    nc, ncarry = params["num_consts"], params["num_carry"]
    if any(w is not None for w in views[nc : nc + ncarry]):
        return False
    depth = len(levels)
    body_views = list(views[:nc]) + [None] * ncarry
    body_views += [
        None if w is None else w.stacked(depth) for w in views[nc + ncarry :]
    ]
    # The carry and `xs` are taken as batched: the perturbations of the taps inside
    # are scanned over with them.
    body_batched = in_batched[:nc] + [True] * (len(views) - nc)
    trial = Plan()
    outs, _ = _walk(
        params["jaxpr"].jaxpr,
        body_views,
        body_batched,
        path,
        levels + (params["length"],),
        trial,
    )
    if any(w is not None for w in outs):
        return False
    plan.merge(trial)
    plan.scans.add(path)
    return True


# ------------------------------------------------------------------------- running


def run(closed: Any, plan: Plan, args: list, zs: dict) -> tuple[list, dict]:
    """Evaluates `closed` on `args` with the taps' floating outputs perturbed by `zs`
    (path -> one array per perturbed output, stacked over the enclosing scans) and
    returns (outputs, captured operands per tap path)."""
    return _run(closed.jaxpr, list(closed.consts), args, (), plan, zs)


def _run(
    jaxpr: Any, consts: list, args: list, path: Path, plan: Plan, zs: dict
) -> tuple[list, dict]:
    env: dict = {}

    def read(v):
        return v.val if _is_literal(v) else env[v]

    env.update(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))
    acts: dict = {}
    for i, eqn in enumerate(jaxpr.eqns):
        here = path + (i,)
        invals = [read(v) for v in eqn.invars]
        if here in plan.inline:
            body, body_consts = _sub_jaxpr(eqn)
            outs, inner = _run(body, body_consts, invals, here, plan, zs)
            acts.update(inner)
        elif here in plan.scans:
            outs, inner = _run_scan(eqn, invals, here, plan, zs)
            acts.update(inner)
        else:
            outs = bind(eqn, invals)
            tap = plan.taps.get(here)
            if tap is not None:
                if tap.alias is None:
                    for k, z in zip(tap.perturbed, zs[here]):
                        outs[k] = outs[k] + z
                acts[here] = tuple(invals[j] for j in tap.captured)
        for v, x in zip(eqn.outvars, outs):
            if not isinstance(v, jex.DropVar):
                env[v] = x
    return [read(v) for v in jaxpr.outvars], acts


def _run_scan(eqn: Any, invals: list, path: Path, plan: Plan, zs: dict):
    params = eqn.params
    nc, ncarry = params["num_consts"], params["num_carry"]
    body = params["jaxpr"]
    consts, init, xs = invals[:nc], invals[nc : nc + ncarry], invals[nc + ncarry :]
    # The perturbations of the taps inside are scanned over like `xs`.
    inner_zs = {p: z for p, z in zs.items() if p[: len(path)] == path}

    def step(carry, x):
        xs_t, zs_t = x
        outs, acts = _run(
            body.jaxpr, list(body.consts), [*consts, *carry, *xs_t], path, plan, zs_t
        )
        return outs[:ncarry], (outs[ncarry:], acts)

    carry, (ys, acts) = lax.scan(
        step,
        init,
        (xs, inner_zs),
        length=params["length"],
        reverse=params["reverse"],
        unroll=params["unroll"],
    )
    return [*carry, *ys], acts


# ------------------------------------------------------------------------- per step


def over_levels(tap: Tap, fn, merge=None, extra: int = 0):
    """`fn(*args, *more)` of one scan step lifted to the stacked `args` of `tap` (one
    vmap per enclosing scan); the `extra` trailing arguments (output cotangents) are
    stacked at every level. `merge(depth, out)`, if given, folds each new stacked axis
    into `fn`'s output after the vmap at that depth."""

    def lifted(depth, *args):
        if depth == len(tap.levels):
            return fn(*args)
        axes = tap.level_axes(depth) + (0,) * extra
        out = jax.vmap(ft.partial(lifted, depth + 1), in_axes=axes)(*args)
        return out if merge is None else merge(depth, out)

    return ft.partial(lifted, 0)
