"""The label model in the maps (networks/label_model.py, ``--label_model_weight``)."""

from __future__ import annotations

import pytest
import torch

from dataset import load_dataset
from dataset.errors import InputError
from networks import build_model
from networks.checkpoint import model_from_checkpoint, read_checkpoint, save_checkpoint
from networks.config import get_tiny_config
from networks.label_model import BaggedLabelModel, LabelModelVote, NdviBand, label_model_from_state


def _bagged(dataset, members=3, with_ndvi=True, seed=0):
    torch.manual_seed(seed)
    ndvi = NdviBand(dataset.bands.index("red"), dataset.bands.index("nir"), dataset.mean, dataset.std) \
        if with_ndvi else None
    return BaggedLabelModel.empty(dataset.num_bands, dataset.num_classes, members, ndvi).eval()


def test_the_vote_adds_the_weighted_log_probabilities_to_both_branches():
    dataset = load_dataset("sample")
    torch.manual_seed(1)
    network, label_model = build_model(get_tiny_config()).eval(), _bagged(dataset)
    x = torch.randn(2, 4, 64, 64)
    with torch.no_grad():
        vit, cnn = network(x)
        log_probs = label_model(x)
        voted_vit, voted_cnn = LabelModelVote(network, label_model, 0.5)(x)
    torch.testing.assert_close(voted_vit, vit + 0.5 * log_probs)
    torch.testing.assert_close(voted_cnn, cnn + 0.5 * log_probs)
    # what the maps blend: the published softmax of the mean, here of the network's mean plus the vote
    torch.testing.assert_close(torch.softmax((voted_vit + voted_cnn) / 2, 1),
                               torch.softmax((vit + cnn) / 2 + 0.5 * log_probs, 1))
    assert not torch.allclose(torch.softmax((vit + cnn) / 2, 1), torch.softmax((voted_vit + voted_cnn) / 2, 1))


@pytest.mark.parametrize("with_ndvi", [True, False])
def test_a_label_model_is_rebuilt_from_its_state(with_ndvi):
    dataset = load_dataset("sample")
    original = _bagged(dataset, members=4, with_ndvi=with_ndvi)
    rebuilt = label_model_from_state(original.state_dict(), dataset.bands, dataset.num_classes, dataset.mean,
                                     dataset.std, with_ndvi=with_ndvi)
    assert len(rebuilt.members) == 4
    x = torch.randn(1, 4, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), original(x))
    with pytest.raises(RuntimeError):  # the features must match: 15 with NDVI, 12 without
        label_model_from_state(original.state_dict(), dataset.bands, dataset.num_classes, dataset.mean,
                               dataset.std, with_ndvi=not with_ndvi)


def test_a_checkpoint_maps_with_its_recipe_s_vote_unless_overridden(tiny_checkpoint, tmp_path):
    dataset = load_dataset("sample")
    payload = read_checkpoint(tiny_checkpoint)
    label_model = _bagged(dataset)
    voting = str(tmp_path / "voting.pth")
    save_checkpoint(voting, model=model_from_checkpoint(payload), model_config=payload["model_config"],
                    dataset=payload["dataset"], label_model=label_model.state_dict(),
                    train_args={"recipe": "robust", "label_model_weight": 2.0, "refine_features": "ndvi"})
    model = model_from_checkpoint(read_checkpoint(voting))
    assert isinstance(model, LabelModelVote) and model.label_model_weight == 2.0
    assert model.dataset.name == "sample" and not model.training
    plain = model_from_checkpoint(read_checkpoint(voting), label_model_weight=0)
    assert not isinstance(plain, LabelModelVote) and plain.label_model_weight == 0
    assert model_from_checkpoint(payload).label_model_weight == 0  # a checkpoint from before the option
    x = torch.randn(1, 4, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], plain(x)[0] + 2.0 * label_model(x))
    with pytest.raises(InputError, match="has none"):
        model_from_checkpoint(payload, label_model_weight=1.0, where="tiny.pth")
    mismatched = dict(read_checkpoint(voting), train_args={"label_model_weight": 1.0, "refine_features": "bands"})
    with pytest.raises(InputError, match="voting.pth: its label model does not match its dataset and settings"):
        model_from_checkpoint(mismatched, where="voting.pth")  # fitted with NDVI, read without
