"""One description of every standard option: a field of an options dataclass carries its flag.

The parser's standard flags (`args.build_parser`), `ig.train_kwargs(args)` and the keywords of
`ig.train` are all read from these fields, so an option is written once. To add one, give the
options class of the component that uses it (`TrainOptions`, `StepOptions`, `PrepareOptions`, ...)
a field made with `option(...)`: it becomes the flag `--<name-with-dashes>` in its `--help`
group and a keyword of that component, and the same `parse` checks its value on both paths.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import inspect
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .errors import ConfigError

GROUPS = ("training", "distributed", "checkpoints", "output", "mlflow")  # the --help sections, in order
_META = "igniter_dist.option"
_SAME = object()  # cli_default: the flag's default is the field's


@dataclass(frozen=True)
class Option:
    """What an option's field says besides its name, type and default."""

    help: str
    group: str | None  # its --help section; None: a keyword in Python only, no flag
    parse: Callable[[Any], Any] | None = None  # the argparse type; also checks and normalises Python values
    choices: tuple[str, ...] | None = None
    cli_default: Any = _SAME  # the flag's default if not the field's; a callable is called when the parser is built


def option(default: Any = None, *, help: str, group: str | None, parse: Callable[[Any], Any] | None = None,
           choices: tuple[str, ...] | None = None, cli_default: Any = _SAME,
           default_factory: Callable[[], Any] | None = None) -> Any:
    """A field of an options dataclass that is also the flag `--<name>` (unless `group` is None)."""
    meta = {_META: Option(help, group, parse, choices, cli_default)}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def described(cls: type) -> Iterator[tuple[dataclasses.Field[Any], Option]]:
    """The fields of an options class that `option(...)` made, in declaration order."""
    for f in dataclasses.fields(cls):
        if _META in f.metadata:
            yield f, f.metadata[_META]


class Options:
    """Base of the options dataclasses: a value given in Python is checked and normalised like its flag's
    (`eval_every=2` becomes `Every(2)`); a bad one is a ConfigError naming the flag."""

    def __post_init__(self) -> None:
        for f, opt in described(type(self)):
            value = getattr(self, f.name)
            if value is not None:
                object.__setattr__(self, f.name, _checked(f.name, opt, value))


OptionsT = TypeVar("OptionsT", bound=Options)
F = TypeVar("F", bound=Callable[..., Any])


def _checked(name: str, opt: Option, value: Any) -> Any:
    label = flag(name) if opt.group else name
    if opt.choices is not None and value not in opt.choices:
        raise ConfigError(f"{label} {value!r} is not supported; use one of {', '.join(opt.choices)}.")
    if opt.parse is None:
        return value
    try:
        return opt.parse(value)
    except argparse.ArgumentTypeError as e:
        raise ConfigError(f"{label} {e}.") from None
    except (TypeError, ValueError):
        raise ConfigError(f"{label} takes {getattr(opt.parse, '__name__', 'other')} values, got {value!r}.") from None


def add_flags(parser: argparse.ArgumentParser, classes: tuple[type, ...]) -> None:
    """Add the flags of `classes` to `parser`, one argument group per --help section (GROUPS order)."""
    for group in GROUPS:
        rows = [(f, opt) for cls in classes for f, opt in described(cls) if opt.group == group]
        if not rows:
            continue
        g = parser.add_argument_group(group)
        for f, opt in rows:
            how: dict[str, Any] = {k: v for k, v in (("type", opt.parse), ("choices", opt.choices)) if v is not None}
            g.add_argument(flag(f.name), default=_cli_default(f, opt), help=opt.help, **how)


def _cli_default(f: dataclasses.Field[Any], opt: Option) -> Any:
    if opt.cli_default is not _SAME:
        return opt.cli_default() if callable(opt.cli_default) else opt.cli_default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def flag_values(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The values of `cls`'s flags in parsed `args`, by field name."""
    return {f.name: getattr(args, f.name) for f, opt in described(cls) if opt.group and hasattr(args, f.name)}


def from_args(cls: type[OptionsT], args: argparse.Namespace) -> OptionsT:
    """An options object from parsed flags; fields without a flag keep their defaults."""
    return cls(**flag_values(args, cls))


def from_keywords(caller: str, keywords: Mapping[str, Any], *classes: type) -> list[Any]:
    """One options object per class out of flat keywords; an unknown keyword is a ConfigError."""
    known = [f.name for cls in classes for f in dataclasses.fields(cls)]
    unknown = [k for k in keywords if k not in known]
    if unknown:
        close = difflib.get_close_matches(unknown[0], known, n=1)
        hint = f"did you mean {close[0]}?" if close else f"see help({caller}) for the keywords it takes."
        raise ConfigError(f"{caller}() got an unknown keyword {unknown[0]!r}; {hint}")
    return [cls(**{f.name: keywords[f.name] for f in dataclasses.fields(cls) if f.name in keywords})
            for cls in classes]


def keywords_from(*classes: type) -> Callable[[F], F]:
    """Decorator: a function taking `**options` shows the fields of `classes` as its keyword-only
    parameters, in `help()`, `inspect.signature` and the API reference."""

    def decorate(fn: F) -> F:
        sig = inspect.signature(fn)
        params = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        lines = ["Keyword Args:"]
        for cls in classes:
            for f in dataclasses.fields(cls):
                default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
                params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                                annotation=f.type))
                opt = f.metadata.get(_META)
                if opt is not None:
                    where = f" Flag: ``{flag(f.name)}``." if opt.group else ""
                    lines.append(f"    {f.name} ({f.type}): {opt.help}{where}")
        vars(fn)["__signature__"] = sig.replace(parameters=params)  # what inspect.signature reports
        fn.__doc__ = inspect.cleandoc(fn.__doc__ or "") + "\n\n" + "\n".join(lines)
        return fn

    return decorate
