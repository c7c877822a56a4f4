"""Rules Equinox no longer enforces: abstract-or-final, docstrings, type checks."""

import abc
import inspect

import equinox as eqx
import eqxjd
import jax.numpy as jnp
import jaxtyping
import pytest


def _public_objects():
    for name in dir(eqxjd):
        if name.startswith("_"):
            continue
        obj = getattr(eqxjd, name)
        if inspect.ismodule(obj):
            if not obj.__name__.startswith("eqxjd."):
                continue
            for sub in dir(obj):
                if not sub.startswith("_") and getattr(
                    getattr(obj, sub), "__module__", ""
                ).startswith("eqxjd"):
                    yield f"{name}.{sub}", getattr(obj, sub)
        else:
            yield name, obj


PUBLIC = [(n, o) for n, o in _public_objects() if inspect.isclass(o) or callable(o)]
CLASSES = [(n, o) for n, o in PUBLIC if inspect.isclass(o)]
MODULES = [(n, o) for n, o in CLASSES if issubclass(o, eqx.Module)]


@pytest.mark.parametrize("name,obj", PUBLIC, ids=[n for n, _ in PUBLIC])
def test_public_objects_have_docstrings(name, obj):
    assert inspect.getdoc(obj), f"{name} has no docstring"


@pytest.mark.parametrize("name,cls", MODULES, ids=[n for n, _ in MODULES])
def test_abstract_or_final(name, cls):
    is_abstract = inspect.isabstract(cls) or bool(
        getattr(cls, "__abstractvars__", None)
        or getattr(cls, "__abstractclassvars__", None)
    )
    if cls.__name__.startswith("Abstract"):
        assert is_abstract or abc.ABC in cls.__mro__, f"{name} should be abstract"
    else:
        assert not is_abstract, f"{name} is not Abstract* but cannot be instantiated"
        subclasses = [c for _, c in MODULES if c is not cls and issubclass(c, cls)]
        assert not subclasses, f"{name} is concrete but subclassed by {subclasses}"


def test_type_check_hook_is_active():
    with pytest.raises(jaxtyping.TypeCheckError):
        eqxjd.Mean()(jnp.zeros(3))


def test_all_is_sorted_and_complete():
    names = [n for n in dir(eqxjd) if not n.startswith("_")]
    exported = set(getattr(eqxjd, "__all__", names))
    assert exported <= set(names)
