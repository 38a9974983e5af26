"""Deferred calls that travel: a callable by its import path, its arguments as bytes.

The journal and Celery run a call in another process (or the same one after a
restart), so the call must be something that process can find again: a
module-level function (or a class's static/class method), named
``"package.module:qualname"``. Lambdas, closures, bound methods of live objects
(a request, a view) and arguments that do not serialize are refused when
``defer()`` is called, with an error naming them, rather than lost later.

A call that may be lost says so: ``defer(environ, volatile(func), ...)`` runs in
the worker's memory only, whatever the backend.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import pickle
from collections.abc import Callable
from typing import Any, Generic, ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")


class Unrecordable(TypeError):
    """A deferred call that cannot be written down (journal) or sent (Celery)."""


class volatile(Generic[P, R]):  # a class used like a function: volatile(func)
    """Mark a deferred callable as one that may be lost: it runs in this worker's
    memory even when the journal or Celery is on, and is never recorded."""

    __slots__ = ("func",)

    def __init__(self, func: Callable[P, R]) -> None:
        self.func = func

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.func(*args, **kwargs)


_PATHS: dict[Any, str] = {}  # callables already found by their path (module-level: they live on)
_PATHS_MAX = 1024


def path_of(func: Callable[..., Any]) -> str:
    """``"module:qualname"`` for ``func``, or ``Unrecordable`` saying why there is none."""
    try:
        known = _PATHS.get(func)
    except TypeError:  # not hashable: checked below
        known = None
    if known is not None:
        return known
    path = _path_of(func)
    if len(_PATHS) >= _PATHS_MAX:
        _PATHS.clear()
    with contextlib.suppress(TypeError):
        _PATHS[func] = path
    return path


def _path_of(func: Callable[..., Any]) -> str:
    name = getattr(func, "__qualname__", None) or repr(func)
    owner = getattr(func, "__self__", None)
    if owner is not None and not inspect.isclass(owner) and not inspect.ismodule(owner):
        raise Unrecordable(
            f"{name} is a method bound to a live {type(owner).__name__} object: a restarted "
            "worker cannot find that object; defer a module-level function and pass it "
            "plain data, or wrap it in volatile() if losing it is acceptable"
        )
    module = getattr(func, "__module__", None)
    qualname = getattr(func, "__qualname__", None)
    if not module or not qualname:
        raise Unrecordable(f"{func!r} has no import path (no __module__/__qualname__)")
    if "<lambda>" in qualname or "<locals>" in qualname:
        kind = "a lambda" if "<lambda>" in qualname else "a function defined inside another"
        raise Unrecordable(
            f"{module}.{qualname} is {kind}: only module-level functions can be recorded "
            "and found again; move it to module level, or wrap it in volatile() if "
            "losing it is acceptable"
        )
    path = f"{module}:{qualname}"
    try:
        found = resolve(path)
    except (ImportError, AttributeError) as exc:
        raise Unrecordable(f"{path} cannot be imported back: {exc}") from None
    if found is not func and getattr(found, "__func__", found) is not getattr(
        func, "__func__", func
    ):
        raise Unrecordable(
            f"{path} names another object than the one deferred (a decorator without "
            "functools.wraps, or a name rebound): defer the module-level name itself"
        )
    return path


def resolve(path: str) -> Callable[..., Any]:
    """The callable named ``"module:qualname"``."""
    module, _, qualname = path.partition(":")
    target: Any = importlib.import_module(module)
    for part in qualname.split("."):
        target = getattr(target, part)
    return target


def dumps_args(path: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
    """The arguments as bytes for the journal, or ``Unrecordable`` naming the call."""
    try:
        return pickle.dumps((args, kwargs), protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        raise Unrecordable(
            f"arguments of deferred {path} cannot be recorded ({exc}); pass plain data "
            "(ids, strings, numbers), or wrap the function in volatile() if losing it "
            "is acceptable"
        ) from None


def loads_args(payload: bytes) -> tuple[tuple[Any, ...], dict[str, Any]]:
    args, kwargs = pickle.loads(payload)  # our own journal, written by us
    return tuple(args), dict(kwargs)
