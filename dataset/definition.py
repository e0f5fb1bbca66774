"""Dataset definitions: bands, normalisation, label tables, class names and colours.

A definition is plain JSON data (see ``dataset/definitions/*.json``), loaded by name or from a
file path. It travels inside every checkpoint (``DatasetDefinition.to_dict()``), so mapping and
scoring need nothing but the checkpoint.

Class index 0 is always "no data / ignore": the loss ignores it and a prediction of 0 means
"no class". Label lookups map raw raster codes (NLCD 11, 41, ...) to class indices; a raw code
that is not in a lookup is an error, never silently ignored (docs/design.md §10, defect 13).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dataset.errors import InputError

DEFINITIONS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "definitions")
#: The repository root: shipped definitions and the published lists give paths relative to it.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class LabelTable:
    """Raw raster codes -> class indices for one label product.

    Attributes:
        product: human-readable name of the product (e.g. "NLCD 2011, 30 m").
        lookup: raw code -> class index (0 = ignore).
        nodata: raw codes that mark missing data. Training skips any chip that contains one.
        notes: where the mapping comes from.
    """

    product: str
    lookup: Mapping[int, int]
    nodata: tuple[int, ...] = (0,)
    notes: str = ""

    def lut(self) -> np.ndarray:
        """Return an int16 table indexed by raw code; -1 marks codes not in the lookup."""
        size = max(max(self.lookup), max(self.nodata, default=0)) + 1
        table = np.full(size, -1, dtype=np.int16)
        for code, index in self.lookup.items():
            table[code] = index
        for code in self.nodata:
            if table[code] < 0:
                table[code] = 0
        return table

    def map(self, raw: np.ndarray, source: str = "label") -> np.ndarray:
        """Map raw codes to class indices (uint8).

        Raises:
            InputError: naming ``source`` and the raw codes that the table does not know.
        """
        table = self.lut()
        raw = np.asarray(raw)
        if raw.size == 0:
            return raw.astype(np.uint8)
        if raw.dtype.kind == "f":
            if not np.all(np.isfinite(raw)) or not np.all(raw == np.round(raw)):
                raise InputError(f"{source}: label values must be whole numbers")
            raw = raw.astype(np.int64)
        lo, hi = int(raw.min()), int(raw.max())
        if lo < 0 or hi >= table.size or np.any(table[raw] < 0):
            unknown = [int(c) for c in np.unique(raw) if c < 0 or c >= table.size or table[c] < 0]
            raise InputError(
                f"{source}: label codes {unknown[:20]} are not in the {self.product} table "
                f"(known codes: {sorted(self.lookup)})"
            )
        return table[raw].astype(np.uint8)

    def to_dict(self) -> dict[str, Any]:
        return {
            "product": self.product,
            "lookup": {str(k): int(v) for k, v in sorted(self.lookup.items())},
            "nodata": list(self.nodata),
            "notes": self.notes,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str) -> LabelTable:
        try:
            lookup = {int(k): int(v) for k, v in dict(data["lookup"]).items()}
            nodata = tuple(int(c) for c in data.get("nodata", [0]))
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"{where}: label table needs 'lookup' of integer codes ({exc})") from None
        if not lookup:
            raise InputError(f"{where}: label table 'lookup' is empty")
        if min(lookup) < 0 or min(nodata, default=0) < 0:
            raise InputError(f"{where}: label codes must be >= 0")
        return cls(str(data.get("product", "")), lookup, nodata, str(data.get("notes", "")))


#: Prose fields of a definition: editing them does not change what a model learns or maps.
PROSE_FIELDS = ("description", "notes", "extra")
#: Fields added after checkpoints were first written: a resumed run compares them only when its checkpoint
#: has them (they matter only when a run is started).
LATER_FIELDS = ("non_vegetated_class",)


def without_prose(definition: Mapping[str, Any]) -> dict[str, Any]:
    """``definition`` (a :meth:`DatasetDefinition.to_dict`) without its prose fields, at any depth."""
    return {k: without_prose(v) if isinstance(v, Mapping) else v for k, v in definition.items()
            if k not in PROSE_FIELDS}


@dataclass(frozen=True)
class DatasetDefinition:
    """Everything the code needs to know about one dataset.

    Attributes:
        name: short name (also the JSON file name for the shipped definitions).
        bands: band names in file order; the image must have exactly this many bands.
        mean, std: per-band normalisation, ``x' = (x - mean) / std`` (docs/design.md §2).
        class_names, class_colors: one entry per model output class; index 0 is "no data".
        lr_label: the low-resolution training label table.
        hr_label: optional high-resolution reference table, mapping raw reference codes to
            *evaluation* class indices (1..len(eval_class_names)-1; 0 = excluded).
        eval_class_names: names of the evaluation classes (index 0 = no data); defaults to
            ``class_names``.
        prediction_to_eval: optional model class -> evaluation class table, for models whose
            output classes differ from the reference's (e.g. 16 NLCD classes scored on 4).
        list_path: default CSV list (relative to the repository root, or absolute).
        list_root: how relative paths inside the list resolve: "csv" (the CSV's folder) or
            "repo" (the repository root, as in the published lists).
        description: free text.
        lr_mixes: optional expected class mix inside one LR pixel of each raw LR code (code ->
            share per model class, summing to 1), for training recipes that match the predicted
            mix of an LR pixel instead of its majority class (``--label_loss mix``). Written from
            the LR product's own class definitions, never from HR reference data.
        non_vegetated_class: optional name of the class of pixels without vegetation (impervious
            surfaces, bare ground), which label refinement may seed from the imagery's NDVI
            (``--refine_seeds``; needs bands named "red" and "nir").
    """

    name: str
    bands: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...]
    class_colors: tuple[tuple[int, int, int], ...]
    lr_label: LabelTable
    hr_label: LabelTable | None = None
    eval_class_names: tuple[str, ...] | None = None
    prediction_to_eval: Mapping[int, int] | None = None
    list_path: str | None = None
    list_root: str = "csv"
    description: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)
    lr_mixes: Mapping[int, tuple[float, ...]] | None = None
    non_vegetated_class: str | None = None

    @property
    def num_bands(self) -> int:
        return len(self.bands)

    @property
    def num_classes(self) -> int:
        """Model output classes, index 0 (no data) included."""
        return len(self.class_names)

    @property
    def eval_names(self) -> tuple[str, ...]:
        return self.eval_class_names or self.class_names

    def mix_table(self, with_mixes: bool = True) -> np.ndarray:
        """float32 ``(codes, classes)``: row ``c`` is the class mix of raw LR code ``c``; a code without
        a mix (every code when ``with_mixes`` is False: what hard labels train on) gets all of its
        lookup class; no-data and unknown codes get an all-zero row."""
        size = max(max(self.lr_label.lookup), max(self.lr_label.nodata, default=0)) + 1
        table = np.zeros((size, self.num_classes), dtype=np.float32)
        for code, index in self.lr_label.lookup.items():
            if index > 0:
                table[code, index] = 1.0
        for code, mix in ((self.lr_mixes or {}) if with_mixes else {}).items():
            table[code] = mix
        return table

    def colormap(self) -> dict[int, tuple[int, int, int, int]]:
        """Palette for GeoTIFF band 1: class index -> RGBA."""
        return {i: (int(r), int(g), int(b), 255) for i, (r, g, b) in enumerate(self.class_colors)}

    def default_list(self) -> str | None:
        if self.list_path is None:
            return None
        return self.list_path if os.path.isabs(self.list_path) else os.path.join(REPO_ROOT, self.list_path)

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (JSON types only): what a checkpoint stores."""
        return {
            "name": self.name,
            "description": self.description,
            "bands": list(self.bands),
            "mean": [float(v) for v in self.mean],
            "std": [float(v) for v in self.std],
            "classes": [
                {"name": n, "color": [int(c) for c in col]}
                for n, col in zip(self.class_names, self.class_colors)
            ],
            "lr_label": self.lr_label.to_dict(),
            "hr_label": self.hr_label.to_dict() if self.hr_label else None,
            "eval_class_names": list(self.eval_class_names) if self.eval_class_names else None,
            "prediction_to_eval": (
                {str(k): int(v) for k, v in sorted(self.prediction_to_eval.items())}
                if self.prediction_to_eval
                else None
            ),
            "list": self.list_path,
            "list_root": self.list_root,
            "extra": dict(self.extra),
            **({"lr_mixes": {str(code): {name: share for name, share in zip(self.class_names, mix) if share}
                             for code, mix in sorted(self.lr_mixes.items())}} if self.lr_mixes else {}),
            **({"non_vegetated_class": self.non_vegetated_class} if self.non_vegetated_class else {}),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "dataset definition") -> DatasetDefinition:
        """Build and validate a definition from plain data.

        Raises:
            InputError: naming ``where`` and the field that is missing or inconsistent.
        """
        missing = [k for k in ("name", "bands", "mean", "std", "classes", "lr_label") if k not in data]
        if missing:
            raise InputError(f"{where}: missing fields {missing}")
        bands = tuple(str(b) for b in data["bands"])
        mean = tuple(float(v) for v in data["mean"])
        std = tuple(float(v) for v in data["std"])
        if not bands or len(mean) != len(bands) or len(std) != len(bands):
            raise InputError(f"{where}: 'bands', 'mean' and 'std' must have the same non-zero length")
        if any(s <= 0 for s in std):
            raise InputError(f"{where}: every 'std' must be > 0")
        classes = list(data["classes"])
        if len(classes) < 2:
            raise InputError(f"{where}: 'classes' needs index 0 (no data) and at least one class")
        names = tuple(str(c["name"]) for c in classes)
        colors = tuple(tuple(int(v) for v in c.get("color", (0, 0, 0)))[:3] for c in classes)
        lr = LabelTable.from_dict(data["lr_label"], f"{where} lr_label")
        if max(lr.lookup.values()) >= len(names) or min(lr.lookup.values()) < 0:
            raise InputError(f"{where}: lr_label maps to class indices outside 0..{len(names) - 1}")
        hr = LabelTable.from_dict(data["hr_label"], f"{where} hr_label") if data.get("hr_label") else None
        eval_names = tuple(data["eval_class_names"]) if data.get("eval_class_names") else None
        pred_to_eval = (
            {int(k): int(v) for k, v in dict(data["prediction_to_eval"]).items()}
            if data.get("prediction_to_eval")
            else None
        )
        n_eval = len(eval_names or names)
        if hr and max(hr.lookup.values()) >= n_eval:
            raise InputError(f"{where}: hr_label maps to evaluation classes outside 0..{n_eval - 1}")
        if eval_names and not pred_to_eval and len(eval_names) != len(names):
            raise InputError(f"{where}: 'eval_class_names' differs from 'classes': give 'prediction_to_eval'")
        non_vegetated = data.get("non_vegetated_class")
        if non_vegetated is not None and non_vegetated not in names[1:]:
            raise InputError(f"{where}: 'non_vegetated_class' {non_vegetated!r} is not one of the classes {list(names[1:])}")
        list_root = str(data.get("list_root", "csv"))
        if list_root not in ("csv", "repo"):
            raise InputError(f"{where}: 'list_root' must be 'csv' or 'repo', not {list_root!r}")
        return cls(
            name=str(data["name"]),
            bands=bands,
            mean=mean,
            std=std,
            class_names=names,
            class_colors=colors,
            lr_label=lr,
            hr_label=hr,
            eval_class_names=eval_names,
            prediction_to_eval=pred_to_eval,
            list_path=data.get("list"),
            list_root=list_root,
            description=str(data.get("description", "")),
            extra=dict(data.get("extra") or {}),
            lr_mixes=_read_mixes(data.get("lr_mixes"), names, lr, where),
            non_vegetated_class=non_vegetated,
        )


def _read_mixes(data: Any, names: tuple[str, ...], table: LabelTable,
                where: str) -> dict[int, tuple[float, ...]] | None:
    """``{"21": {"low vegetation": 0.6, ...}}`` -> ``{21: (0, 0, 0.3, 0.6, 0.1)}``, checked."""
    if not data:
        return None
    mixes = {}
    for code, shares in dict(data).items():
        try:
            code_value = int(code)
            shares = {str(k): float(v) for k, v in dict(shares).items()}
        except (TypeError, ValueError):
            raise InputError(f"{where}: lr_mixes[{code!r}] must map class names to shares") from None
        if code_value not in table.lookup:
            raise InputError(f"{where}: lr_mixes has code {code_value}, which the lr_label table does not know")
        unknown = sorted(set(shares) - set(names[1:]))
        if unknown or any(v < 0 for v in shares.values()) or abs(sum(shares.values()) - 1.0) > 1e-6:
            raise InputError(f"{where}: lr_mixes[{code_value}] must give non-negative shares of the classes "
                             f"{list(names[1:])} that sum to 1 (got {shares})")
        mixes[code_value] = tuple(shares.get(name, 0.0) for name in names)
    return mixes


def available_datasets() -> list[str]:
    """Names of the definitions shipped in ``dataset/definitions``."""
    return sorted(f[:-5] for f in os.listdir(DEFINITIONS_DIR) if f.endswith(".json"))


def _definition_path(ref: str, relative_to: str | None = None) -> str:
    """Path of a definition given by shipped name or by file path (relative to ``relative_to``)."""
    if not ref.endswith(".json") and os.sep not in ref:
        candidate = os.path.join(DEFINITIONS_DIR, ref + ".json")
        if not os.path.exists(candidate):
            raise InputError(
                f"unknown dataset {ref!r}: choose one of {available_datasets()} or give a JSON file path"
            )
        return candidate
    if relative_to and not os.path.isabs(ref):
        return os.path.join(relative_to, ref)
    return ref


def _read_definition(path: str, seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """Read a definition file; resolve its optional ``"extends"`` (a name or a path relative to it).

    The fields of the file replace those of the definition it extends, key by key at the top
    level (a given ``lr_label`` replaces the whole base table).
    """
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        raise InputError(f"{path}: dataset definition file not found") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: cannot read dataset definition ({exc})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: a dataset definition must be a JSON object")
    base = data.pop("extends", None)
    if base is None:
        return data
    base_path = _definition_path(str(base), os.path.dirname(os.path.abspath(path)))
    if os.path.abspath(base_path) in seen + (os.path.abspath(path),):
        raise InputError(f"{path}: 'extends' loops back to {base_path}")
    merged = _read_definition(base_path, seen + (os.path.abspath(path),))
    merged.update(data)
    return merged


def load_dataset(name_or_path: str | Mapping[str, Any]) -> DatasetDefinition:
    """Load a definition by shipped name, from a JSON file path, or from a dict (a checkpoint's).

    A file may start from another definition with ``"extends": "<name or path>"`` and give only
    the fields that differ (see docs/prepare_data.md).

    Raises:
        InputError: unknown name, unreadable file or invalid content.
    """
    if isinstance(name_or_path, Mapping):
        return DatasetDefinition.from_dict(name_or_path)
    if isinstance(name_or_path, DatasetDefinition):
        return name_or_path
    path = _definition_path(str(name_or_path))
    return DatasetDefinition.from_dict(_read_definition(path), where=path)
