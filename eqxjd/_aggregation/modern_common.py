"""Small helpers shared by the modern (issue 4) methods: validation and state checks."""

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import PRNGKeyArray


def concrete(value) -> np.ndarray | None:
    """`value` as a NumPy array if it is concrete (not traced), else `None`."""
    if isinstance(value, jax.core.Tracer):
        return None
    try:
        return np.asarray(value)
    except Exception:  # pragma: no cover - exotic array types
        return None


def check_range(
    value,
    name: str,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """Raises a `ValueError` unless every entry of a concrete `value` lies in the range.

    Traced values (a module built inside `jit`) are not checked.
    """
    array = concrete(value)
    if array is None:
        return
    lo = "(" if low_open else "["
    hi = ")" if high_open else "]"
    interval = (
        f"{lo}{'-inf' if low is None else low}, {'inf' if high is None else high}{hi}"
    )
    ok = not np.any(np.isnan(array.astype(float)))
    if low is not None:
        ok = ok and bool(np.all(array > low) if low_open else np.all(array >= low))
    if high is not None:
        ok = ok and bool(np.all(array < high) if high_open else np.all(array <= high))
    if not ok:
        raise ValueError(f"`{name}` must be in {interval}; got {name}={value!r}.")


def check_scalar(value, name: str) -> None:
    """Raises a `ValueError` unless `value` is a scalar (0-d)."""
    if jnp.ndim(value) != 0:
        raise ValueError(
            f"`{name}` must be a scalar; got an array of shape {jnp.shape(value)}."
        )


def check_state_shape(actual: tuple, expected: tuple, method: str) -> None:
    """Raises a `ValueError` when a state was built for another number of objectives."""
    if tuple(actual) != tuple(expected):
        raise ValueError(
            f"This `{method}` state was built for shape {tuple(actual)} but the input "
            f"needs {tuple(expected)} (the number of objectives or parameters "
            "changed). Build a fresh state with `init` (this is also how to reset it)."
        )


def require_key(key: PRNGKeyArray | None, name: str) -> PRNGKeyArray:
    if key is None:
        raise ValueError(
            f"`{name}` is random: pass a JAX PRNG key, e.g. `key=jax.random.key(0)` "
            "(split it between calls)."
        )
    return key
