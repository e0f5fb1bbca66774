"""The package layout: imports only go down the pipeline's layers, and every command-line option is
declared once (the parsers are generated from the options dataclasses)."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import os
import re
import typing

import pytest

from dataset.options import Options, _metadata, _value_type, add_options, parse_options
from mapping.options import MapOptions, MosaicOptions
from preparation.options import AlignOptions, CheckOptions, ListWriteOptions, StatsOptions
from scoring.options import ScoreOptions
from tests.helpers import REPO_ROOT
from training.options import TrainOptions

#: What each package may import from the project (besides itself): the layers, bottom first.
ALLOWED = {
    "dataset": set(),
    "runtime": {"dataset"},
    "networks": {"dataset"},
    "preparation": {"dataset"},
    "mapping": {"dataset", "runtime", "networks"},
    "scoring": {"dataset", "mapping"},
    "training": {"dataset", "runtime", "networks", "mapping", "scoring"},
}
SCRIPTS = {"train", "test", "mIoU", "tools", "tests"}


def imported_names(path: str) -> set[str]:
    """Top-level names imported anywhere in ``path`` (module level or inside functions)."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def project_imports(path: str) -> set[str]:
    """Top-level project names imported anywhere in ``path``."""
    return imported_names(path) & (set(ALLOWED) | SCRIPTS)


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_only_go_down(package):
    wrong = {}
    for folder, _, files in os.walk(os.path.join(REPO_ROOT, package)):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                extra = project_imports(path) - ALLOWED[package] - {package}
                if extra:
                    wrong[os.path.relpath(path, REPO_ROOT)] = sorted(extra)
    assert not wrong, f"imports that go up or sideways: {wrong}"


CLIS = [TrainOptions, MapOptions, ScoreOptions, AlignOptions, ListWriteOptions, StatsOptions, CheckOptions,
        MosaicOptions]
REQUIRED = {
    MapOptions: ["--checkpoint", "x.pth"],
    ScoreOptions: ["--pred_dir", "maps"],
    AlignOptions: ["--lr", "a.tif", "b.tif", "--out_dir", "labels", "--images", "*.tif"],
    ListWriteOptions: ["--images", "*.tif", "--labels", "{stem}_lr.tif", "--out", "list.csv"],
    StatsOptions: ["--images", "*.tif"],
    CheckOptions: ["--dataset", "sample"],
    MosaicOptions: ["--pred_dir", "maps"],
}


def _required_names(cls):
    return {f.name for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}


@pytest.mark.parametrize("cls", CLIS, ids=lambda c: c.__name__)
def test_parser_is_generated_from_the_options(cls):
    argv = REQUIRED.get(cls, [])
    parsed = parse_options(cls, argv)
    built = cls(**{name: getattr(parsed, name) for name in _required_names(cls)})
    for f in dataclasses.fields(cls):
        if f"--{f.name}" not in argv:  # not given: the dataclass default
            assert getattr(parsed, f.name) == getattr(built, f.name), f.name
    parser = add_options(argparse.ArgumentParser(), cls)
    flags = {a.dest: a for a in parser._actions if a.dest != "help"}
    assert set(flags) == {f.name for f in dataclasses.fields(cls)}
    for dest, action in flags.items():
        assert action.help, f"--{dest} has no help"
        assert action.option_strings[0] == f"--{dest}"


def test_shared_options_have_one_declaration():
    """--dataset, --list_dir, --list_root and the device options carry the same help in every command."""
    helps: dict[str, set[str]] = {}
    for cls in (TrainOptions, MapOptions, ScoreOptions, CheckOptions):
        parser = add_options(argparse.ArgumentParser(), cls)
        for action in parser._actions:
            if action.dest in {"dataset", "list_dir", "list_root", "device", "gpu", "amp"}:
                helps.setdefault(action.dest, set()).add(action.help.split(" (default")[0])
    assert all(len(texts) == 1 for texts in helps.values()), helps


def test_one_flag_per_concept_with_published_aliases():
    train = parse_options(TrainOptions, ["--savepath", "runs/a"])
    mapped = parse_options(MapOptions, ["--model_path", "x.pth", "--save_path", "maps"])
    assert train.out_dir == "runs/a" and mapped.out_dir == "maps" and mapped.checkpoint == "x.pth"
    names = {f.name for cls in CLIS for f in dataclasses.fields(cls)}
    # Output folders are --out_dir everywhere ('--out' is a file: a CSV or JSON); chips are --chip_size;
    # relative list paths follow --list_root.
    assert not names & {"savepath", "save_path", "out_folder", "chip", "root", "list"}


@pytest.mark.parametrize("cls,argv,message", [
    (TrainOptions, ["--batch_size", "1"], "--batch_size 1: must be at least 2"),
    (TrainOptions, ["--chip_size", "100"], "--chip_size 100: must be a positive multiple of 32"),
    (TrainOptions, ["--base_lr", "nan"], "--base_lr nan: must be a positive number"),
    (MapOptions, ["--checkpoint", "x", "--stride", "300"], "--stride 300: must be in 1..224"),
    (MapOptions, ["--checkpoint", "x", "--num_workers", "-1"], "--num_workers -1: must be at least 0"),
    (MapOptions, ["--checkpoint", "x", "--shard", "3/3"], "--shard 3/3: K must be in 0..N-1"),
    (MapOptions, ["--checkpoint", "x", "--shard", "2"], "--shard 2: give K/N"),
    (MapOptions, ["--checkpoint", "x", "--overview_min_size", "-1"], "--overview_min_size -1: must be at least 0"),
    (AlignOptions, ["--lr", "a", "--out_dir", "o", "--images", "x", "--window", "0"], "--window 0: must be in 1..65536"),
    (AlignOptions, ["--lr", "a", "--out_dir", "o"], "one of --list_dir CSV or --images GLOB"),
    (ListWriteOptions, ["--images", "x", "--labels", "y", "--out", "z", "--val_fraction", "2"],
     "--val_fraction 2.0: must be between 0 and 1"),
    (StatsOptions, ["--images", "x", "--size", "0"], "--size 0: must be in 1..65536"),
    (CheckOptions, [], "--dataset is required"),
    # Fault table of docs/reliability.md: negative, huge and non-finite values.
    (AlignOptions, ["--lr", "a", "--out_dir", "o", "--images", "x", "--window", "-5"], "--window -5: must be in"),
    (AlignOptions, ["--lr", "a", "--out_dir", "o", "--images", "x", "--cache_mb", "0"], "--cache_mb 0: must be in"),
    (StatsOptions, ["--images", "x", "--windows", "100000000000"], "--windows 100000000000: must be in"),
    (StatsOptions, ["--images", "x", "--size", "99999999999"], "--size 99999999999: must be in"),
    (TrainOptions, ["--seed", str(2**70)], f"--seed {2**70}: must be in"),
    (TrainOptions, ["--entropy_weight", "inf"], "--entropy_weight inf: must be at least 0"),
    (ListWriteOptions, ["--images", "x", "--labels", "y", "--out", "z", "--split", "random", "--val_fraction", "0"],
     "--val_fraction 0.0: a split needs a share strictly between 0 and 1"),
])
def test_values_are_checked_before_work(cls, argv, message):
    from dataset.errors import InputError

    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(".", r"\.")):
        parse_options(cls, argv)


def test_every_cli_options_class_derives_from_options():
    assert all(issubclass(cls, Options) for cls in CLIS)


#: Import name of each distribution of requirements.txt whose import name differs.
IMPORT_NAMES = {"ml-collections": "ml_collections"}


def runtime_requirements() -> list[str]:
    """Distribution names of the runtime part of requirements.txt (above "# Tests")."""
    names = []
    for line in open(os.path.join(REPO_ROOT, "requirements.txt"), encoding="utf-8"):
        if line.startswith("# Tests"):
            break
        if line.strip() and not line.startswith("#"):
            names.append(re.split(r"[<>=!~ ]", line.strip())[0])
    return names


def test_every_runtime_requirement_is_imported_and_recorded():
    """Nothing is declared and unused, and run_config.json records the version of each."""
    from training.run_folder import RECORDED_PACKAGES

    imported = set()
    for path in _text_files((".py",)):
        imported.update(imported_names(path))
    requirements = runtime_requirements()
    unused = [name for name in requirements if IMPORT_NAMES.get(name, name) not in imported]
    assert not unused, f"declared in requirements.txt but imported nowhere: {unused}"
    assert sorted(RECORDED_PACKAGES) == sorted(requirements)


def _text_files(suffixes=(".py", ".md", ".json", ".sh", ".txt", ".toml")):
    """The project's own files: not hidden folders (.git, CI's .ci-venv), runs, caches, or any
    virtual environment (a folder holding pyvenv.cfg) a user keeps in the clone."""
    for folder, dirs, files in os.walk(REPO_ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("runs", "__pycache__")
                   and not os.path.isfile(os.path.join(folder, d, "pyvenv.cfg"))]
        for name in files:
            if name.endswith(suffixes):
                yield os.path.join(folder, name)


def test_the_repository_is_self_contained():
    """Code and docs cite only what ships: no path into a workspace folder beside the clone, and every
    design section that a comment or document cites exists in docs/design.md."""
    outside = ("../" + "shared", "shared" + "/spec", "shared" + "/data", "shared" + "/reference")
    design = open(os.path.join(REPO_ROOT, "docs", "design.md"), encoding="utf-8").read()
    sections = set(re.findall(r"^#{2,4} (\d+(?:\.\d+)*)\.? ", design, flags=re.MULTILINE))
    missing, cited = {}, set()
    for path in _text_files():
        text = open(path, encoding="utf-8").read()
        where = os.path.relpath(path, REPO_ROOT)
        assert not [p for p in outside if p in text], f"{where} cites a folder outside the repository"
        for number in re.findall(r"design(?:\.md)? §(\d+(?:\.\d+)*)", text):
            cited.add(number)
            if number not in sections:
                missing.setdefault(where, []).append(number)
    assert not missing, f"design sections cited but not in docs/design.md: {missing}"
    assert {"3.3.4", "6.5", "8.2", "10"} <= cited
@pytest.mark.parametrize("cls", CLIS, ids=lambda c: c.__name__)
def test_every_numeric_option_has_a_check(cls):
    """A number no check looks at is a number that can start an hour of wrong work."""
    hints = typing.get_type_hints(cls)
    unchecked = [f.name for f in dataclasses.fields(cls)
                 if _value_type(hints[f.name])[0] in (int, float) and _metadata(cls, f.name).get("check") is None]
    assert not unchecked, f"numeric options without a check: {unchecked}"


def test_every_training_flag_is_in_the_docs_flag_table():
    """docs/training.md "Every flag" lists every option of train.py (a flag added without a row is a flag users
    cannot find)."""
    text = open(os.path.join(REPO_ROOT, "docs", "training.md"), encoding="utf-8").read()
    table = text.split("## Every flag", 1)[1].split("\n## ", 1)[0]
    rows = {line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| `--")}
    listed = {flag for row in rows for flag in re.findall(r"`--(\w+)`", row)}
    missing = [field.name for field in dataclasses.fields(TrainOptions) if field.name not in listed]
    assert not missing, f"train.py flags without a row in docs/training.md's flag table: {missing}"
