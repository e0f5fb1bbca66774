"""Command-line options, each declared once: a dataclass field with its default, help and check beside it.

Every command describes its settings as a dataclass of :func:`option` fields. :func:`add_options`
turns the class into argparse arguments (flag, aliases, type, default, choices and help all come
from the field), :func:`parse_options` turns the command line back into the dataclass, and
:meth:`Options.check` validates every value before any work starts. Settings that several commands
share are mixins declared once: :class:`TileListOptions` here (the dataset and its tile list) and
:class:`runtime.device.DeviceOptions`. A subclass may change a shared option's default with
:func:`override`, keeping its declaration.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from dataset.errors import InputError
from dataset.lists import read_dataset_list

#: A check returns None when the value is fine, else what is wrong ("must be at least 1").
Check = Callable[[Any], "str | None"]
T = TypeVar("T", bound="Options")


def option(default: Any = None, help: str = "", *, required: bool = False, aliases: Sequence[str] = (),
           choices: Sequence[Any] | None = None, metavar: str | None = None, group: str | None = None,
           check: Check | None = None, none_means: str | None = None,
           default_factory: Callable[[], Any] | None = None) -> Any:
    """A dataclass field that is also a command-line option ``--<field name>``.

    Args:
        default: the default value (or give ``default_factory``, or ``required``).
        required: the option has no default and must be given (declare the class ``kw_only``).
        help: what the option does; "(default: ...)" is appended from the default.
        aliases: other flags for it, only the published project's spellings.
        choices: allowed values.
        group: argparse group title in ``--help``.
        check: validation of a given value (see :data:`Check`); None values are not checked.
        none_means: what a None default means, for the help ("the checkpoint's own").
    """
    metadata = {"help": help, "aliases": tuple(aliases), "choices": choices, "metavar": metavar, "group": group,
                "check": check, "none_means": none_means}
    if required:
        return dataclasses.field(metadata=metadata)
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def override(default: Any, none_means: str | None = None) -> Any:
    """Redeclare an inherited option with another default; its help and checks stay those of the base."""
    return dataclasses.field(default=default, metadata={"override": True, "none_means": none_means})


# ---------------------------------------------------------------------------------------------- checks
def _finite(value: float) -> bool:
    return not isinstance(value, float) or math.isfinite(value)


def at_least(minimum: float) -> Check:
    return lambda value: None if _finite(value) and value >= minimum else f"must be at least {minimum}"


def between(minimum: float, maximum: float) -> Check:
    """Counts and sizes with a sane upper end (a typo such as 10**11 windows would exhaust memory)."""
    return lambda value: None if minimum <= value <= maximum else f"must be in {minimum}..{maximum}"


#: Seeds feed numpy and torch generators, which take at most 64 bits.
seed_range = between(0, 2**63 - 1)


def positive_number(value: float) -> str | None:
    return None if math.isfinite(value) and value > 0 else "must be a positive number"


def multiple_of(step: int) -> Check:
    """Chip sizes: a positive multiple of the network's ``networks.config.SIZE_MULTIPLE``."""
    return lambda value: None if value >= step and value % step == 0 else f"must be a positive multiple of {step}"


def fraction(value: float) -> str | None:
    return None if 0 <= value <= 1 else "must be between 0 and 1"


# ---------------------------------------------------------------------------------------------- classes
@dataclasses.dataclass
class Options:
    """Base of every command's options."""

    def check(self) -> None:
        """Raise InputError naming the first option whose value its check refuses."""
        for f in dataclasses.fields(self):
            check = _metadata(type(self), f.name).get("check")
            value = getattr(self, f.name)
            if check is not None and value is not None:
                problem = check(value)
                if problem:
                    raise InputError(f"--{f.name} {value}: {problem}")


def _metadata(cls: type, name: str) -> dict[str, Any]:
    """The option's declaration: from the first class in the MRO that declares it, with overrides on top."""
    merged: dict[str, Any] = {}
    seen = None
    for klass in reversed(cls.__mro__):
        found = vars(klass).get("__dataclass_fields__", {}).get(name)
        if found is not None and found is not seen:  # a class that (re)declares the field
            seen = found
            meta = dict(found.metadata)
            if meta.pop("override", False):
                merged.update({k: v for k, v in meta.items() if v is not None})
            else:
                merged = meta
    return merged


def _value_type(annotation: Any) -> tuple[type, bool]:
    """``(int, float, str or bool, is a list)`` from a field annotation such as ``int | None`` or ``list[str]``."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        kinds = [a for a in typing.get_args(annotation) if a is not type(None)]
        annotation = kinds[0]
    if typing.get_origin(annotation) is list:
        return typing.get_args(annotation)[0], True
    return annotation, False


def _default_text(f: dataclasses.Field, meta: dict[str, Any]) -> str:
    if f.default is dataclasses.MISSING:
        return ""
    if f.default is None:
        return f" (default: {meta['none_means']})" if meta.get("none_means") else ""
    return f" (default: {f.default})"


def add_options(parser: argparse.ArgumentParser, cls: type[Options]) -> argparse.ArgumentParser:
    """Add one argument per field of ``cls`` to ``parser`` (grouped by their ``group``)."""
    hints = typing.get_type_hints(cls)
    groups: dict[str | None, Any] = {None: parser}
    for f in dataclasses.fields(cls):
        meta = _metadata(cls, f.name)
        group = meta.get("group")
        if group not in groups:
            groups[group] = parser.add_argument_group(group)
        kind, many = _value_type(hints[f.name])
        flags = [f"--{f.name}", *meta.get("aliases", ())]
        kwargs: dict[str, Any] = {"dest": f.name, "help": meta.get("help", "")}
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            kwargs["required"] = True
        if kind is bool:
            kwargs["action"] = "store_true"
        else:
            kwargs.update(type=kind, metavar=meta.get("metavar"), choices=meta.get("choices"))
            if many:
                kwargs["nargs"] = "+"
            kwargs["help"] += _default_text(f, meta)
        # Defaults stay in the dataclass: argparse reports only what was given.
        groups[group].add_argument(*flags, default=argparse.SUPPRESS, **kwargs)
    return parser


def parse_options(cls: type[T], argv: Sequence[str] | None, description: str | None = None) -> T:
    """Parse ``argv`` into ``cls`` (and check it); ``--help`` lists every option with its default."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    args = add_options(parser, cls).parse_args(argv)
    options = cls(**vars(args))
    options.check()
    return options


# ---------------------------------------------------------------------------------------------- shared
@dataclasses.dataclass
class ListOptions(Options):
    """A CSV tile list and how its relative paths resolve."""

    list_dir: str | None = option(
        None, "CSV tile list with image_fn and, where the command needs them, label_fn and hr_label_fn",
        group="data", none_means="the dataset's own list")
    list_root: str | None = option(
        None, "resolve relative paths in the list against the CSV's folder or the repository root",
        choices=("csv", "repo"), group="data",
        none_means="'repo' for lists beside the dataset's default list, else 'csv'")


@dataclasses.dataclass
class TileListOptions(ListOptions):
    """The dataset definition and its tile list: train.py, test.py, mIoU.py and prepare_data check."""

    dataset: str | None = option(
        None, "dataset definition: a name in dataset/definitions (Chesapeake, Chesapeake_NLCD16, sample, ...) "
              "or a JSON file path", group="data", none_means="the checkpoint's own, or the one stored in the maps")

    def read_list(self, dataset: Any, required: Sequence[str] = ("image_fn", "label_fn"), *,
                  path: str | None = None, check_exists: bool = True) -> tuple[str, list]:
        """``(path, entries)`` of ``path`` (default ``--list_dir``, else the dataset's own list), relative
        paths resolved by the ``--list_root`` rule (see :mod:`dataset.lists`)."""
        return read_dataset_list(dataset, path or self.list_dir, self.list_root, required, check_exists)
