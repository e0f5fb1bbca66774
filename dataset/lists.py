"""CSV tile lists: ``image_fn,label_fn[,hr_label_fn]``, one tile per row.

Relative paths resolve against the CSV's own folder (``root="csv"``, the default for lists a user
writes) or against the repository root (``root="repo"``, the published layout whose paths start
with ``./dataset/...``). A dataset definition says which one its default list uses.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass

from dataset.definition import REPO_ROOT, DatasetDefinition
from dataset.errors import InputError


@dataclass(frozen=True)
class TileEntry:
    """One row of a list, paths resolved to absolute."""

    image: str
    label: str | None = None
    hr_label: str | None = None

    @property
    def stem(self) -> str:
        return os.path.splitext(os.path.basename(self.image))[0]


def _resolve(path: str, base: str) -> str:
    path = os.path.expanduser(path.strip())
    return os.path.normpath(path if os.path.isabs(path) else os.path.join(base, path))


def read_list(
    csv_path: str,
    required: Sequence[str] = ("image_fn", "label_fn"),
    root: str = "csv",
    check_exists: bool = True,
) -> list[TileEntry]:
    """Read a tile list.

    Args:
        csv_path: the CSV file.
        required: columns that must be present and non-empty in every row.
        root: "csv" to resolve relative paths against the CSV's folder, "repo" against the
            repository root.
        check_exists: raise if a listed file (of a required column) does not exist.

    A tile (image) listed twice is refused by every command: training would weigh it double and
    mapping would write its map twice.

    Raises:
        InputError: missing file, missing columns, empty list, missing tiles or a repeated tile,
            each naming the CSV (and row) at fault.
    """
    if not os.path.isfile(csv_path):
        raise InputError(f"{csv_path}: list file not found")
    base = REPO_ROOT if root == "repo" else os.path.dirname(os.path.abspath(csv_path))
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            missing = [c for c in required if c not in columns]
            if missing:
                raise InputError(f"{csv_path}: missing columns {missing} (found {columns})")
            rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"{csv_path}: cannot read list ({exc})") from None
    entries = []
    first_line: dict[str, int] = {}
    for line, row in enumerate(rows, start=2):
        if not any(row.values()):
            continue
        empty = [c for c in required if not row.get(c)]
        if empty:
            raise InputError(f"{csv_path}:{line}: empty {empty}")
        paths = {c: _resolve(row[c], base) if row.get(c) else None for c in ("image_fn", "label_fn", "hr_label_fn")}
        if check_exists:
            for c in required:
                if not os.path.isfile(paths[c]):
                    raise InputError(f"{csv_path}:{line}: {c} file not found: {paths[c]}")
        image = paths["image_fn"]
        if image is not None and image in first_line:
            raise InputError(f"{csv_path}:{line}: image_fn {row['image_fn']} repeats line {first_line[image]}; "
                             "list each tile once")
        first_line.setdefault(image, line)
        entries.append(TileEntry(paths["image_fn"], paths["label_fn"], paths["hr_label_fn"]))
    if not entries:
        raise InputError(f"{csv_path}: the list has no tiles")
    return entries


def list_root_for(list_path: str, dataset: DatasetDefinition, root: str | None = None) -> str:
    """How relative paths of ``list_path`` resolve: ``root`` if given; the dataset's ``list_root``
    for lists in the folder of its default list (the published ``dataset/CSV_list``); else "csv"."""
    if root:
        return root
    default = dataset.default_list()
    if default and os.path.dirname(os.path.abspath(default)) == os.path.dirname(os.path.abspath(list_path)):
        return dataset.list_root
    return "csv"


def read_dataset_list(dataset: DatasetDefinition, list_path: str | None = None, root: str | None = None,
                      required: Sequence[str] = ("image_fn", "label_fn"),
                      check_exists: bool = True) -> tuple[str, list[TileEntry]]:
    """Read ``list_path``, or the dataset's default list when it is None (``--list_dir`` of every CLI).

    Returns:
        ``(the list's path, its entries)``.

    Raises:
        InputError: no list given and the dataset has none, or any :func:`read_list` error.
    """
    path = list_path or dataset.default_list()
    if not path:
        raise InputError(f"dataset {dataset.name!r} has no default list: give --list_dir")
    return path, read_list(path, required=required, root=list_root_for(path, dataset, root),
                           check_exists=check_exists)
