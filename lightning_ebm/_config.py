"""Components as plain configs: what checkpoints and pretrained directories store instead of pickles.

A model built in Python holds objects (an energy network, a sampler, a latent, an optimizer
factory). Pickling them into a checkpoint's hyper-parameters makes the checkpoint unloadable with
``torch.load(weights_only=True)`` and ties it to the script that made it. Instead each component is
written as ``{"class_path": "pkg.mod.Class", "init_args": {...}}`` (nested for components that take
components; a factory such as ``functools.partial(torch.optim.Adam, lr=1e-3)`` the same way), the
format of the ``lightning-ebm`` CLI's configs.

Where do the ``init_args`` come from?

* the library's classes record their constructor arguments when they are built (``RecordInit``);
* a class may say it itself with a method ``get_init_args() -> dict``;
* otherwise they are recovered from the constructor's signature and same-named attributes
  (defaults where there is no attribute), and accepted only if rebuilding from them gives an
  object with the same attributes and the same parameter shapes.

Building from a config imports only allowed classes: those of ``lightning_ebm``, ``torch.nn`` and
``torch.optim``; classes of modules the process has already imported that are modules, samplers,
latents, optimizers or schedulers; and what the caller allows explicitly (``allow_classes``).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

__all__ = [
    "ComponentConfigError",
    "RecordInit",
    "allowing",
    "build",
    "class_path",
    "hparams_to_config",
    "import_class",
    "is_config",
    "to_config",
]

CLASS_PATH, INIT_ARGS, MISSING = "class_path", "init_args", "missing"
TRUSTED_PREFIXES = ("lightning_ebm.", "torch.nn.", "torch.optim.")
_PLAIN = (bool, int, float, str, type(None))
_ABSENT = object()


class ComponentConfigError(ValueError):
    """A component cannot be rebuilt from its config (not importable, not allowed, arguments missing)."""


class RecordInit:
    """Mixin that records the arguments a class was constructed with, for ``to_config``.

    Recorded in ``__new__`` (it receives the constructor's arguments), so subclasses need no
    change and ``__init__``'s signature stays what the CLI reads.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        obj = super().__new__(cls)
        object.__setattr__(obj, "_init_record", (args, kwargs))
        return obj


# ---------------------------------------------------------------------------------------- describe
def class_path(cls: type) -> str:
    """``module.QualifiedName`` of a class."""
    return f"{cls.__module__}.{cls.__qualname__}"


def is_config(value: Any) -> bool:
    """Whether ``value`` is a component config (a dict with a ``class_path``)."""
    return isinstance(value, dict) and isinstance(value.get(CLASS_PATH), str)


def _where_problem(cls: type) -> str | None:
    if cls.__module__ == "__main__":
        return (f"{cls.__qualname__} is defined in the running script (__main__), which another process "
                f"cannot import: move {cls.__qualname__} into an importable module")
    if "<locals>" in cls.__qualname__:
        return f"{cls.__qualname__} is defined inside a function: define it at the top level of a module"
    return None


def _signature(cls: type) -> inspect.Signature:
    return inspect.signature(cls.__init__)


def _bind_recorded(obj: Any) -> dict[str, Any] | None:
    record = obj.__dict__.get("_init_record")
    if not record or (not record[0] and not record[1] and _required(type(obj))):
        return None  # made by copy/unpickling without arguments: nothing recorded
    args, kwargs = record
    try:
        bound = _signature(type(obj)).bind(obj, *args, **kwargs)
    except TypeError:  # a constructor that does not take what __new__ saw: describe it otherwise
        return None
    bound.apply_defaults()
    out: dict[str, Any] = {}
    for i, (name, value) in enumerate(bound.arguments.items()):
        param = bound.signature.parameters[name]
        if i == 0:
            continue  # self
        if param.kind is param.VAR_KEYWORD:
            out.update(value)
        elif param.kind is param.VAR_POSITIONAL:
            if value:
                return None
        else:
            out[name] = value
    return out


def _required(cls: type) -> list[str]:
    params = list(_signature(cls).parameters.values())[1:]
    return [p.name for p in params if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def _recover(obj: Any) -> tuple[dict[str, Any], list[str]]:
    """Arguments from the signature and same-named attributes; names of required ones not found."""
    args: dict[str, Any] = {}
    missing: list[str] = []
    for p in list(_signature(type(obj)).parameters.values())[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.name in vars(obj) or (isinstance(obj, nn.Module) and hasattr(obj, p.name)):
            args[p.name] = getattr(obj, p.name)
        elif p.default is not p.empty:
            args[p.name] = p.default
        else:
            missing.append(p.name)
    return args, missing


def _norm(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_norm(v) for v in value)
    return value


def _attr_differences(obj: Any, other: Any, names: Iterable[str]) -> list[str]:
    """Names among ``names`` whose plain attribute values (or parameter shapes) differ."""
    out = []
    for name in names:
        a, b = getattr(obj, name, _ABSENT), getattr(other, name, _ABSENT)
        if isinstance(_norm(a), (*_PLAIN, tuple)) and _norm(a) != _norm(b):
            out.append(name)
    if isinstance(obj, nn.Module) and isinstance(other, nn.Module):
        shapes = {k: (tuple(v.shape), v.dtype) for k, v in obj.state_dict().items() if isinstance(v, torch.Tensor)}
        other_shapes = {k: (tuple(v.shape), v.dtype) for k, v in other.state_dict().items()
                        if isinstance(v, torch.Tensor)}
        if set(shapes) != set(other_shapes) or any(shapes[k] != other_shapes[k] for k in shapes
                                                   if "_extra_state" not in k and "buffer" not in k):
            out.append("parameter shapes")
    return out


def _rebuild(config: dict[str, Any]) -> Any:
    try:
        with torch.device("meta"):
            return build(config, "check", allow_classes=[config[CLASS_PATH]], _trust_all=True)
    except Exception:  # some constructors cannot run on the meta device: build for real
        return build(config, "check", allow_classes=[config[CLASS_PATH]], _trust_all=True)


def _describe_object(obj: Any, where: str, problems: list[str]) -> dict[str, Any]:
    cls = type(obj)
    path = class_path(cls)
    if problem := _where_problem(cls):
        problems.append(f"{where} ({cls.__qualname__}): {problem}")
    if hasattr(obj, "get_init_args") and callable(obj.get_init_args):
        args, source, missing = dict(obj.get_init_args()), "get_init_args", []
    elif (recorded := _bind_recorded(obj)) is not None:
        args, source, missing = recorded, "recorded", []
    else:
        args, missing = _recover(obj)
        source = "recovered"
    if missing:
        problems.append(
            f"{where} ({cls.__qualname__}): its constructor arguments {missing} are not attributes of the object, "
            f"so they cannot be recorded: store them as same-named attributes (self.{missing[0]} = {missing[0]}) "
            f"or give {cls.__qualname__} a method get_init_args() returning its constructor arguments")
        init = {k: to_config(v, f"{where}.{k}", problems) for k, v in args.items()}
        return {CLASS_PATH: path, INIT_ARGS: init, MISSING: missing}
    n_problems = len(problems)
    init = {k: to_config(v, f"{where}.{k}", problems) for k, v in args.items()}
    config = {CLASS_PATH: path, INIT_ARGS: init}
    if len(problems) > n_problems:  # a part cannot be described: nothing to verify by rebuilding
        return config
    plain_names = [k for k in args if isinstance(_norm(getattr(obj, k, _ABSENT)), (*_PLAIN, tuple))]
    stale = [k for k in plain_names if _norm(getattr(obj, k)) != _norm(args[k])]
    if source == "recovered" or stale or (source == "get_init_args" and isinstance(obj, nn.Module)):
        try:
            diff = _attr_differences(obj, _rebuild(config), plain_names)
        except Exception as err:  # noqa: BLE001 - any failure to rebuild means the config is not trustworthy
            diff = [f"rebuilding failed: {type(err).__name__}: {err}"]
        if diff and source == "recorded":  # attributes changed after construction: take their current values
            for k in diff:
                if k in args:
                    init[k] = to_config(getattr(obj, k), f"{where}.{k}", problems)
            with contextlib.suppress(Exception):
                diff = _attr_differences(obj, _rebuild(config), plain_names)
        if diff:
            problems.append(
                f"{where} ({cls.__qualname__}): rebuilding it from {source} constructor arguments {sorted(args)} "
                f"gives a different object ({', '.join(diff)} differ): give {cls.__qualname__} a method "
                f"get_init_args() returning its constructor arguments")
            config[MISSING] = diff
    return config


def to_config(value: Any, where: str = "value", problems: list[str] | None = None) -> Any:
    """``value`` as plain data: numbers, strings, lists, dicts and component configs.

    Objects become ``{"class_path", "init_args"}``, classes and ``functools.partial`` factories
    too; what cannot be described faithfully gets a ``"missing"`` entry and a line in ``problems``.
    """
    problems = [] if problems is None else problems
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, (list, tuple)):
        return type(value)(to_config(v, f"{where}[{i}]", problems) for i, v in enumerate(value))
    if isinstance(value, dict):
        return {k: to_config(v, f"{where}.{k}", problems) for k, v in value.items()}
    if (isinstance(value, functools.partial) and getattr(value.func, "__module__", "").startswith("jsonargparse")
            and value.args and isinstance(value.args[-1], type)):  # the CLI's factory: partial(..., cls, **kw)
        value = functools.partial(value.args[-1], **value.keywords)
    if isinstance(value, functools.partial) and isinstance(value.func, type) and not value.args:
        if problem := _where_problem(value.func):
            problems.append(f"{where} ({value.func.__qualname__}): {problem}")
        return {CLASS_PATH: class_path(value.func),
                INIT_ARGS: {k: to_config(v, f"{where}.{k}", problems) for k, v in value.keywords.items()}}
    if isinstance(value, type):
        if problem := _where_problem(value):
            problems.append(f"{where} ({value.__qualname__}): {problem}")
        return {CLASS_PATH: class_path(value), INIT_ARGS: {}}
    if isinstance(value, (torch.dtype, torch.device, torch.Tensor)):
        return value  # torch.load(weights_only=True) reads these
    if (inspect.isfunction(value) or inspect.ismethod(value) or inspect.isbuiltin(value)
            or isinstance(value, functools.partial)):
        name = getattr(value, "__qualname__", repr(value))
        problems.append(f"{where} ({name}): a function or a partial of one cannot be stored as a config: use a "
                        "class or functools.partial(SomeClass, ...) with keyword arguments")
        return {CLASS_PATH: f"{getattr(value, '__module__', '?')}.{name}", INIT_ARGS: {}, MISSING: ["a function"]}
    try:
        return _describe_object(value, where, problems)
    except Exception as err:  # noqa: BLE001 - describing must never break a checkpoint save
        name = type(value).__qualname__
        problems.append(f"{where} ({name}): cannot be described as a config ({type(err).__name__}: {err})")
        return {CLASS_PATH: class_path(type(value)), INIT_ARGS: {}, MISSING: [f"{type(err).__name__}: {err}"]}


def hparams_to_config(hparams: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """A module's hyper-parameters as plain data, and what could not be described.

    The CLI's own format (plain dicts with ``_instantiator``) passes through unchanged.
    """
    if "_instantiator" in hparams:
        return dict(hparams), []
    problems: list[str] = []
    return {k: to_config(v, k, problems) for k, v in hparams.items()}, problems


# ------------------------------------------------------------------------------------------- build
_CONTEXT: list[tuple[list[str], bool]] = []  # (allowed class paths, whether imported classes are allowed)
_EXPECTED_BASES: tuple[type, ...] = (nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler)


@contextlib.contextmanager
def allowing(allow_classes: Sequence[str] | None, *, imported: bool = True) -> Iterator[None]:
    """Allow these class paths (or module prefixes) in every ``build`` inside the block.

    ``imported=False`` also forbids classes merely because their module is imported already (the
    strict policy of pretrained directories: the library's, torch's and the listed classes only).
    """
    _CONTEXT.append((list(allow_classes or []), imported))
    try:
        yield
    finally:
        _CONTEXT.pop()


def _expected_bases() -> tuple[type, ...]:
    from .latents import Latent
    from .samplers import Sampler

    return (*_EXPECTED_BASES, Sampler, Latent)


def _matches(path: str, entries: Iterable[str]) -> bool:
    return any(path == e or path.startswith(e.rstrip(".") + ".") for e in entries)


def _lookup(module_name: str, qualname: str) -> Any:
    obj: Any = sys.modules[module_name]
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def import_class(path: str, where: str, allow_classes: Sequence[str] = ()) -> type:
    """The class at ``path`` if the policy allows it (see the module docstring), else a clear error."""
    allowed = [a for group, _ in _CONTEXT for a in group] + list(allow_classes)
    return _import_class(path, where, allowed, _CONTEXT[-1][1] if _CONTEXT else True)


def _import_class(path: str, where: str, allow_classes: Sequence[str], imported: bool = True) -> type:
    parts = path.split(".")
    trusted = _matches(path, allow_classes) or path.startswith(TRUSTED_PREFIXES)
    candidates = [(".".join(parts[:i]), ".".join(parts[i:])) for i in range(len(parts) - 1, 0, -1)]
    if not trusted and imported:  # what is imported already, and only of the component base classes
        for module_name, qualname in candidates:
            if module_name in sys.modules:
                with contextlib.suppress(AttributeError):
                    cls = _lookup(module_name, qualname)
                    if isinstance(cls, type) and issubclass(cls, _expected_bases()):
                        return cls
    if not trusted:
        if parts[0] == "__main__":
            name = parts[-1]
            how = (f"pass {where.split('.')[0]}={name}(...) yourself when loading" if imported else
                   f"in a script that defines it, pass allow_classes=[{path!r}]")
            raise ComponentConfigError(
                f"{where}: the class {name} was defined in the training script (__main__), which this process "
                f"cannot import; move {name} into an importable module (then retrain or re-save), or {how}")
        also = " and already imported modules, samplers, latents, optimizers and schedulers" if imported else ""
        raise ComponentConfigError(
            f"{where}: the config names the class {path!r}, which is not allowed to be imported: only classes "
            f"of {', '.join(p.rstrip('.') for p in TRUSTED_PREFIXES)}{also} are; if you trust it, pass "
            f"allow_classes=[{path!r}]")
    error: Exception | None = None
    for module_name, qualname in candidates:
        try:
            importlib.import_module(module_name)
            cls = _lookup(module_name, qualname)
        except (ImportError, AttributeError) as err:
            error = error or err
            continue
        if not isinstance(cls, type):
            raise ComponentConfigError(f"{where}: {path!r} is not a class, and a config may only name classes")
        return cls
    raise ComponentConfigError(f"{where}: cannot import the class {path!r} ({type(error).__name__}: {error})")


def build(value: Any, where: str, *, factory: bool = False, allow_classes: Sequence[str] | None = None,
          _trust_all: bool = False) -> Any:
    """The object a config describes (``value`` itself if it is not a config).

    ``factory=True`` returns ``functools.partial(cls, **init_args)`` instead of an instance (for
    arguments such as ``optimizer`` that take a callable). Nested configs are built too.
    """
    if isinstance(value, (list, tuple)):
        return type(value)(build(v, f"{where}[{i}]", allow_classes=allow_classes, _trust_all=_trust_all)
                           for i, v in enumerate(value))
    if not isinstance(value, dict):
        return value
    if not is_config(value):
        return {k: build(v, f"{where}.{k}", allow_classes=allow_classes, _trust_all=_trust_all)
                for k, v in value.items()}
    path = value[CLASS_PATH]
    cls = (_import_class(path, where, [path]) if _trust_all else import_class(path, where, allow_classes or ()))
    if value.get(MISSING):
        raise ComponentConfigError(
            f"{where}: the checkpoint could not record how to build {cls.__qualname__} (missing: "
            f"{', '.join(map(str, value[MISSING]))}); pass {where.split('.')[0]}={cls.__qualname__}(...) when loading")
    init_args = value.get(INIT_ARGS) or {}
    if not isinstance(init_args, dict):
        raise ComponentConfigError(f"{where}: init_args of {path!r} must be a mapping, got {init_args!r}")
    kwargs = {k: build(v, f"{where}.{k}", allow_classes=allow_classes, _trust_all=_trust_all)
              for k, v in init_args.items()}
    if factory:
        return functools.partial(cls, **kwargs)
    return cls(**kwargs)
