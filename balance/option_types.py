"""Checks a config node's options against the annotations of the class it builds, before anything is built.

A value of the wrong type (``method.warmup_epochs=abc``, ``data.batch_size=1.5``) or a key the class does not take
(``method.warmup_epoch=3``) would otherwise surface epochs later as a ``TypeError`` deep in training, or never. The
check reads the ``__init__`` signatures along the class's MRO (following ``**kwargs`` up to the base that ends them),
so a new method or datamodule is covered by its annotations alone. Ranges and choices stay with each class.
"""

from __future__ import annotations

import collections.abc
import inspect
import types
import typing
from collections.abc import Mapping
from typing import Any

from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf

#: the packages whose classes are checked; third-party targets (optimizers, loggers) keep their own checks
CHECKED_PACKAGES = ("balance", "datamodules")
MISSING = "???"


def check_options(node: DictConfig | Mapping[str, Any], prefix: str,
                  packages: tuple[str, ...] = CHECKED_PACKAGES) -> None:
    """Refuses an option of ``node`` (and of the nested nodes with a ``_target_``) that its class does not take,
    or whose value does not fit the annotation, naming the key as typed on the command line.

    Args:
        node: a config node with a ``_target_``; other nodes are left alone.
        prefix: the node's key path, e.g. ``method`` or ``model.encoders.audio``.
        packages: the top-level packages whose classes are checked (e.g. ``("pytorch_lightning",)`` for the
            trainer node).

    Raises:
        ValueError: naming the key, the expected type and the value given (or the options the class takes).
    """
    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=True, throw_on_missing=False)
    if not isinstance(node, Mapping):
        return
    for key, value in node.items():
        if isinstance(value, Mapping):
            check_options(value, f"{prefix}.{key}", packages)
    target = node.get("_target_")
    if not isinstance(target, str) or not target.startswith(tuple(f"{p}." for p in packages)):
        return
    built = get_object(target)
    parameters, open_ended = _parameters(built, packages)
    for key, value in node.items():
        if key.startswith("_") or value == MISSING:
            continue
        if key not in parameters:
            if open_ended:
                continue
            raise ValueError(f"{prefix}.{key} is not an option of {built.__name__}; its options are "
                             f"{', '.join(sorted(parameters))}")
        expected = parameters[key]
        if expected is not None and not _fits(value, expected):
            raise ValueError(f"{prefix}.{key} must be {_describe(expected)}, got {value!r}")


def _parameters(built: Any, packages: tuple[str, ...]) -> tuple[dict[str, Any], bool]:
    """The keyword parameters ``built`` takes, each with its annotation (None where unknown), and whether it also
    passes unknown keywords on to a class outside the checked packages."""
    functions = [built] if not isinstance(built, type) else [
        klass.__dict__["__init__"] for klass in built.__mro__ if "__init__" in klass.__dict__]
    parameters: dict[str, Any] = {}
    for function in functions:
        if str(getattr(function, "__module__", "")).split(".")[0] not in packages:
            return parameters, True
        try:
            hints = typing.get_type_hints(function)
        except (NameError, TypeError):
            hints = {}
        open_ended = False
        for name, parameter in inspect.signature(function).parameters.items():
            if parameter.kind is inspect.Parameter.VAR_KEYWORD:
                open_ended = True
            elif parameter.kind is not inspect.Parameter.VAR_POSITIONAL and name != "self":
                parameters.setdefault(name, hints.get(name))
        if not open_ended:
            return parameters, False
    return parameters, True


def _fits(value: Any, expected: Any) -> bool:
    origin = typing.get_origin(expected)
    arguments = typing.get_args(expected)
    if expected is Any or expected is inspect.Parameter.empty:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, argument) for argument in arguments)
    if origin is typing.Literal:
        return value in arguments
    if expected is type(None):
        return value is None
    if expected is bool:
        return isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is str:
        return isinstance(value, str)
    if origin in (list, tuple, collections.abc.Sequence):
        if not isinstance(value, (list, tuple)):
            return False
        return not arguments or all(_fits(v, arguments[0]) for v in value)
    if origin in (dict, collections.abc.Mapping):
        return isinstance(value, Mapping)
    # Modules, callables and other objects are built by Hydra or passed in by the run: nothing to check here.
    return True


def _describe(expected: Any) -> str:
    origin = typing.get_origin(expected)
    arguments = typing.get_args(expected)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(argument) for argument in arguments)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in arguments)
    if origin in (list, tuple, collections.abc.Sequence):
        return "a list" + (f" whose items are each {_describe(arguments[0])}" if arguments else "")
    if origin in (dict, collections.abc.Mapping):
        return "a mapping"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}
    return names.get(expected, getattr(expected, "__name__", str(expected)))
