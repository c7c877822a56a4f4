r"""Batched dense linear algebra that cannot deadlock XLA:CPU's thread pool.

jaxlib's CPU LAPACK kernels split a batch of matrices over XLA's intra-op thread pool
and block until every piece is done. In a program that spans several devices of one
process (host devices from `--xla_force_host_platform_device_count`, or the local
devices of one process in a multi-process run), the other devices' threads may be
waiting in a collective on that same pool; then no thread is left to run the pieces
and the program hangs for good (jaxlib 0.10 and 0.11, from a few tens of 256 x 256
Cholesky factorisations per device). A kernel given one matrix does not split.

So when the process has several CPU devices, the functions below issue one LAPACK
call per matrix (`lax.map` over the batch) on CPU: the same kernel on the same
matrices, hence the same numbers, without the pool. Elsewhere (one CPU device, GPU,
TPU) they are the batched calls. The choice between the two is made when the program
is lowered for its platform (`lax.platform_dependent`).
"""

import functools as ft
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.lax as lax
import jax.numpy as jnp
from jaxtyping import Array


def several_cpu_devices() -> bool:
    """Whether this process has more than one CPU device (where batched LAPACK calls
    must be issued one matrix at a time)."""
    try:
        return jax.local_device_count("cpu") > 1
    except RuntimeError:  # no CPU backend
        return False


def _one_at_a_time(fn: Callable[..., Any], batch_ndim: int, *operands: Array) -> Any:
    batch = operands[0].shape[:batch_ndim]
    flat = tuple(jnp.reshape(x, (-1,) + x.shape[batch_ndim:]) for x in operands)
    out = lax.map(lambda xs: fn(*xs), flat)
    return jax.tree.map(lambda y: jnp.reshape(y, batch + y.shape[1:]), out)


def _guarded(fn: Callable[..., Any], batch_ndim: int, *operands: Array) -> Any:
    """`fn(*operands)`, with `fn` called on one matrix at a time on a CPU with several
    devices. The operands share their `batch_ndim` leading (batch) axes."""
    if batch_ndim == 0 or math.prod(operands[0].shape[:batch_ndim]) <= 1:
        return fn(*operands)
    if not several_cpu_devices():
        return fn(*operands)
    serial = ft.partial(_one_at_a_time, fn, batch_ndim)
    return lax.platform_dependent(*operands, cpu=serial, default=fn)


def cholesky(a: Array, *, symmetrize_input: bool = True) -> Array:
    """`lax.linalg.cholesky` on a batch `(..., m, m)`."""
    fn = ft.partial(lax.linalg.cholesky, symmetrize_input=symmetrize_input)
    return _guarded(fn, a.ndim - 2, a)


def triangular_solve(a: Array, b: Array, **kwargs: Any) -> Array:
    """`lax.linalg.triangular_solve` on batches `a: (..., m, m)`, `b: (..., *, *)`
    with the same batch axes."""
    fn = ft.partial(lax.linalg.triangular_solve, **kwargs)
    return _guarded(fn, a.ndim - 2, a, b)


def solve(a: Array, b: Array) -> Array:
    """`jnp.linalg.solve` on batches `a: (..., m, m)`, `b: (..., m, r)`."""
    return _guarded(jnp.linalg.solve, a.ndim - 2, a, b)


def map_lanes(fn: Callable[[Array], Any], xs: Array) -> Any:
    """`jax.vmap(fn)(xs)` for a `fn` that makes LAPACK calls (a per-lane solver from
    another library): one lane at a time on a CPU with several devices."""
    batched = jax.vmap(fn)
    if xs.shape[0] <= 1 or not several_cpu_devices():
        return batched(xs)
    return lax.platform_dependent(xs, cpu=lambda x: lax.map(fn, x), default=batched)
