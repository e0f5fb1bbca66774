"""``--pretrained``: a well-known name is downloaded into the torch hub cache with its sha256 checked
(here from a ``file://`` URL), a local path is used as it is."""

from __future__ import annotations

import hashlib
import os
import pathlib

import pytest
import torch

import networks.pretrained as pretrained
from dataset.errors import InputError
from networks import build_model, get_tiny_config, load_deit_weights, resolve_pretrained


@pytest.fixture
def served_deit(tmp_path, monkeypatch):
    """A DeiT-layout file for the tiny model behind a ``file://`` URL, and an empty hub cache."""
    donor = build_model(get_tiny_config())
    blocks = {k[len("backbone."):]: v + 0.5 for k, v in donor.state_dict().items() if k.startswith("backbone.blocks.")}
    served = tmp_path / "server" / "deit_tiny_patch16_224-a1311bcf.pth"
    served.parent.mkdir()
    torch.save({"model": {**blocks, "cls_token": torch.zeros(1, 1, 24)}}, served)
    digest = hashlib.sha256(served.read_bytes()).hexdigest()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    return served, digest, blocks


def serve(monkeypatch, served: pathlib.Path, prefix: str) -> None:
    monkeypatch.setitem(pretrained.KNOWN_WEIGHTS, "deit_tiny_patch16_224",
                        pretrained.WeightsFile(served.as_uri(), prefix))


def test_known_name_downloads_once_with_a_good_checksum(tmp_path, monkeypatch, served_deit):
    served, digest, blocks = served_deit
    serve(monkeypatch, served, digest[:8])
    path = resolve_pretrained("deit_tiny_patch16_224", progress=False)
    assert path == str(tmp_path / "torch_home" / "hub" / "checkpoints" / served.name)
    assert hashlib.sha256(open(path, "rb").read()).hexdigest() == digest
    model = build_model(get_tiny_config())
    report = load_deit_weights(model, path)
    assert len(report["loaded"]) == len(blocks)
    for key, value in blocks.items():
        assert torch.equal(model.state_dict()["backbone." + key], value)
    served.unlink()  # the cached copy is used from now on, by name or by file name
    assert resolve_pretrained("deit_tiny_patch16_224") == path
    assert resolve_pretrained(served.name) == path


def test_bad_checksum_is_refused_and_nothing_is_kept(tmp_path, monkeypatch, served_deit):
    served, digest, _ = served_deit
    wrong = "0" * 8 if not digest.startswith("0" * 8) else "f" * 8
    serve(monkeypatch, served, wrong)
    with pytest.raises(InputError, match="sha256 check"):
        resolve_pretrained("deit_tiny_patch16_224", progress=False)
    cache = tmp_path / "torch_home" / "hub" / "checkpoints"
    assert os.listdir(cache) == []
    # a cached file that fails its checksum is downloaded again (and refused again here)
    (cache / served.name).write_bytes(b"not the weights")
    with pytest.raises(InputError, match="sha256 check"):
        resolve_pretrained("deit_tiny_patch16_224", progress=False)


def test_local_path_unknown_name_and_no_network(tmp_path, monkeypatch, served_deit):
    served, digest, _ = served_deit
    assert resolve_pretrained(str(served)) == str(served)  # a file is used as it is, offline
    with pytest.raises(InputError, match="give a file path or one of \\['deit_tiny_patch16_224'\\]"):
        resolve_pretrained("deit_small")
    serve(monkeypatch, tmp_path / "server" / "missing.pth", digest[:8])
    with pytest.raises(InputError, match="cannot download .*pass its path to --pretrained"):
        resolve_pretrained("deit_tiny_patch16_224", progress=False)


def test_the_published_file_is_the_deit_release():
    weights = pretrained.KNOWN_WEIGHTS["deit_tiny_patch16_224"]
    assert weights.url == "https://dl.fbaipublicfiles.com/deit/deit_tiny_patch16_224-a1311bcf.pth"
    assert weights.file_name.endswith(f"-{weights.sha256_prefix}.pth")
