import functools as ft

import equinox as eqx

from .._misc import as_vector


def pref_field():
    """A `pref_vector` field: `None` or a 1-D array (validated at construction)."""
    return eqx.field(default=None, converter=ft.partial(as_vector, name="pref_vector"))
