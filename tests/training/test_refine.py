"""--refine_labels local: a per-pixel classifier of local appearance outvotes the LR label's blocks."""

from __future__ import annotations

import numpy as np
import torch

from networks.label_model import BaggedLabelModel, NdviBand, local_features, ndvi
from training.refine import LabelRefiner, fit_local_model, seed_non_vegetated

TREE, GRASS, IMPERVIOUS = 2, 3, 4


def blocky_scene(seed: int, size: int = 96):
    """Image and LR labels of a scene whose labels are two blocks, as an NLCD raster's are.

    Trees are dark and textured, grass bright and smooth. The left half is labelled "forest"
    (code 41 -> tree canopy) but holds a 20 x 20 lawn; the right half is labelled "pasture" (code 81
    -> low vegetation) but holds a 20 x 20 clump of trees. True classes: ``truth``.
    """
    rng = np.random.default_rng(seed)
    truth = np.full((size, size), TREE)
    truth[:, size // 2:] = GRASS
    truth[8:28, 8:28] = GRASS
    truth[60:80, 60:80] = TREE
    image = np.where(truth == TREE, -1.0 + 0.8 * rng.standard_normal((4, size, size)),
                     1.0 + 0.1 * rng.standard_normal((4, size, size)))
    codes = np.where(np.arange(size)[None, :] < size // 2, 41, 81) * np.ones((size, 1), dtype=np.int64)
    label = np.where(codes == 41, TREE, GRASS)
    return (torch.tensor(image, dtype=torch.float32)[None], torch.tensor(codes)[None], torch.tensor(label)[None],
            torch.tensor(truth)[None])


def allowed_table():
    """Codes 41 and 81 may each hold tree canopy or low vegetation; code 11 only water."""
    table = np.zeros((100, 5), dtype=bool)
    table[[41, 81], TREE] = table[[41, 81], GRASS] = True
    table[11, 1] = True
    return table


def test_the_local_model_finds_what_the_blocks_mislabel():
    image, codes, label, truth = blocky_scene(0)
    model, stats = fit_local_model([(image, label)], classes=5, balance=1.0, seed=0)
    refined = LabelRefiner(model, allowed_table(), torch.device("cpu"))(image, codes, label)
    assert (label == truth).float().mean() < 0.92  # the LR label is wrong on the lawn and the clump
    assert (refined == truth).float().mean() > 0.955  # wrong only along class edges, where windows mix
    assert (refined[:, 12:24, 12:24] == GRASS).all()  # the lawn inside the forest block
    assert (refined[:, 64:76, 64:76] == TREE).all()  # the trees inside the pasture block
    assert 0.85 < stats["agreement"] < 0.95 and stats["pixels"] == 4096  # PIXELS_PER_CHIP drawn


def test_refined_classes_stay_within_what_the_code_allows_and_no_data_stays_ignored():
    image, codes, label, _ = blocky_scene(1)
    model, _ = fit_local_model([(image, label)], classes=5, balance=1.0, seed=0)
    codes[:, :, :8] = 11  # a strip coded water: only water is allowed there, whatever it looks like
    label[:, :, :8] = 1
    label[:, :4, :] = 0  # no data
    refined = LabelRefiner(model, allowed_table(), torch.device("cpu"))(image, codes, label)
    assert (refined[:, 4:, :8] == 1).all()
    assert (refined[:, :4, :] == 0).all()
    assert set(refined[:, 4:, 8:].unique().tolist()) <= {TREE, GRASS}


def test_fit_is_reproducible_from_the_seed_and_leaves_the_global_rng_alone():
    image, _, label, _ = blocky_scene(2)
    torch.manual_seed(7)
    before = torch.rand(3)
    torch.manual_seed(7)
    first, _ = fit_local_model([(image, label)], classes=5, balance=0.5, seed=3)
    assert torch.equal(torch.rand(3), before)
    second, _ = fit_local_model([(image, label)], classes=5, balance=0.5, seed=3)
    other, _ = fit_local_model([(image, label)], classes=5, balance=0.5, seed=4)
    for a, b in zip(first.state_dict().values(), second.state_dict().values()):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, c) for a, c in zip(first.state_dict().values(), other.state_dict().values()))


def test_local_features_are_band_mean_and_spread_over_the_window():
    x = torch.randn(1, 2, 9, 9)
    feats = local_features(x, radius=1)
    window = x[0, :, 3:6, 3:6].reshape(2, -1)
    assert torch.allclose(feats[0, :2, 4, 4], x[0, :, 4, 4])
    assert torch.allclose(feats[0, 2:4, 4, 4], window.mean(1), atol=1e-6)
    assert torch.allclose(feats[0, 4:, 4, 4], window.std(1, unbiased=False), atol=1e-5)
    corner = x[0, :, :2, :2].reshape(2, -1)  # at the edge: the part of the window inside the chip
    assert torch.allclose(feats[0, 2:4, 0, 0], corner.mean(1), atol=1e-6)


def test_fitted_to_class_mixes_it_finds_the_roads_of_a_developed_block():
    """Three blocks: forest (code 41), pasture (81) and developed open space (21: 60% low vegetation,
    30% tree canopy, 10% impervious) holding a road. The hard LR class of code 21 is low vegetation,
    so only the class mix says that some of the block is impervious; the road's look occurs nowhere
    else, so a classifier fitted to the mixes gives it to the impervious class."""
    rng = np.random.default_rng(4)
    size, impervious = 96, 4
    truth = np.full((size, size), TREE)
    truth[:, 32:] = GRASS
    truth[:, 76:84] = impervious
    looks = {TREE: (-1.0, 0.8), GRASS: (1.0, 0.1), impervious: (0.0, 0.05)}
    image = np.zeros((4, size, size))
    for cls, (level, spread) in looks.items():
        image[:, truth == cls] = level + spread * rng.standard_normal((4, int((truth == cls).sum())))
    codes = np.select([np.arange(size) < 32, np.arange(size) < 64], [41, 81], 21) * np.ones((size, 1), np.int64)
    mix = np.zeros((100, 5), dtype=np.float32)
    mix[41, TREE] = mix[81, GRASS] = 1.0
    mix[21, [GRASS, TREE, impervious]] = (0.6, 0.3, 0.1)
    image, codes = torch.tensor(image, dtype=torch.float32)[None], torch.tensor(codes)[None]
    hard = torch.tensor(mix.argmax(1))[codes]
    refiners = {}
    for name, target in (("hard", hard), ("mix", torch.from_numpy(mix)[codes])):
        model, _ = fit_local_model([(image, target)], classes=5, balance=0.8, seed=0)
        refiners[name] = LabelRefiner(model, mix > 0, torch.device("cpu"))(image, codes, hard)
    road = refiners["mix"][0, :, 78:82]
    assert (road == impervious).float().mean() > 0.95
    # elsewhere, beyond the reach of the road's neighbourhood window (5 pixels), nothing is impervious
    away = torch.ones(size, size, dtype=torch.bool)
    away[:, 76 - 5:84 + 5] = False
    assert not (refiners["mix"][0][away] == impervious).any()
    assert not (refiners["hard"] == impervious).any()  # the hard labels never say impervious


def test_bagged_members_average_their_log_probabilities():
    image, codes, label, truth = blocky_scene(5)
    members = [fit_local_model([(image, label)], classes=5, balance=1.0, seed=seed)[0] for seed in (0, 1)]
    bag = BaggedLabelModel(members)
    expected = (torch.log_softmax(members[0](image), 1) + torch.log_softmax(members[1](image), 1)) / 2
    assert torch.allclose(bag(image), expected, atol=1e-6)
    restored = BaggedLabelModel.empty(4, 5, 2)
    restored.load_state_dict(bag.state_dict())
    assert torch.equal(restored(image), bag(image))
    refined = LabelRefiner(bag, allowed_table(), torch.device("cpu"))(image, codes, label)
    assert (refined == truth).float().mean() > 0.955


def developed_scene(seed: int, size: int = 96):
    """Raw 4-band (R, G, B, NIR) pixels of a forest block (code 41, columns < 48) and a block of developed
    open space (code 21) crossed by a 6-pixel road (columns 70-75). Vegetation is bright in the NIR, the
    road is not; the LR labels say tree canopy and low vegetation, never impervious."""
    rng = np.random.default_rng(seed)
    truth = np.full((size, size), TREE)
    truth[:, 48:] = GRASS
    truth[:, 70:76] = IMPERVIOUS
    looks = {TREE: (60, 70, 50, 150, 20), GRASS: (110, 140, 90, 190, 8), IMPERVIOUS: (150, 150, 145, 120, 6)}
    raw = np.zeros((4, size, size))
    for cls, (*bands, spread) in looks.items():
        raw[:, truth == cls] = np.array(bands)[:, None] + spread * rng.standard_normal((4, int((truth == cls).sum())))
    codes = np.where(np.arange(size) < 48, 41, 21) * np.ones((size, 1), np.int64)
    raw = torch.tensor(raw.clip(1, 255), dtype=torch.float32)[None]
    codes = torch.tensor(codes)[None]
    return raw, codes, torch.where(codes == 41, TREE, GRASS), torch.tensor(truth)[None]


def test_ndvi_seeds_mark_the_least_vegetated_share_of_each_code():
    raw, codes, label, truth = developed_scene(0)
    label[:, :4] = 0  # no data is never seeded
    shares = torch.zeros(100)
    shares[21] = 0.05  # 5 % of the developed block's labelled pixels (the road is 12.5 % of it)
    seeded = seed_non_vegetated(raw, codes, label, shares, red=0, nir=3, target=IMPERVIOUS)
    marked = seeded == IMPERVIOUS
    developed = (codes == 21) & (label != 0)
    assert int(marked.sum()) == round(0.05 * int(developed.sum()))
    assert (truth[marked] == IMPERVIOUS).all()  # the lowest NDVI of the block is road
    assert ndvi(raw, 0, 3)[marked].max() <= ndvi(raw, 0, 3)[developed & ~marked].min()
    assert torch.equal(seeded[~marked], label[~marked])  # the forest block and no data are untouched


def test_ndvi_seeds_teach_the_local_model_a_class_the_labels_never_give():
    raw, codes, label, truth = developed_scene(1)
    image = (raw - 120) / 50
    allowed = np.zeros((100, 5), dtype=bool)
    allowed[41, [TREE, GRASS]] = allowed[21, [TREE, GRASS, IMPERVIOUS]] = True
    shares = torch.zeros(100)
    shares[21] = 0.05
    refined = {}
    for name, target in (("plain", label), ("seeded", seed_non_vegetated(raw, codes, label, shares, 0, 3, IMPERVIOUS))):
        model, _ = fit_local_model([(image, target)], classes=5, balance=1.0, seed=0)
        refined[name] = LabelRefiner(model, allowed, torch.device("cpu"))(image, codes, label)
    assert not (refined["plain"] == IMPERVIOUS).any()
    road = refined["seeded"][0, :, 71:75]  # the road's inner columns (its edges mix with grass windows)
    # the seeds are the road's lowest-NDVI 40 %; the classifier extends them to most of the road
    assert (road == IMPERVIOUS).float().mean() > 0.55
    assert (refined["seeded"][truth != IMPERVIOUS] == IMPERVIOUS).float().mean() < 0.02


def test_refine_chips_jitter_each_chip_and_band_reproducibly():
    from dataset import load_dataset, read_list
    from dataset.options import parse_options
    from tests.helpers import SAMPLE_LIST
    from training.builders import refine_chips, seeding_plan
    from training.options import TrainOptions

    dataset, entries = load_dataset("sample"), read_list(SAMPLE_LIST)[:2]
    args = ["--dataset", "sample", "--recipe", "robust", "--chip_size", "64", "--batch_size", "4"]
    runs = {}
    for name, strength in (("plain", "0"), ("jittered", "0.3"), ("again", "0.3")):
        options = parse_options(TrainOptions, args + ["--refine_jitter", strength])
        runs[name] = list(refine_chips(entries, dataset, options, seed=5, seeding=seeding_plan(options, dataset)))
    assert len(runs["plain"]) == len(runs["jittered"]) > 0
    for (plain, target), (jittered, jittered_target), (again, _) in zip(runs["plain"], runs["jittered"], runs["again"]):
        assert torch.equal(target, jittered_target)  # the same chips and targets
        assert torch.equal(jittered, again)  # drawn from the seed
        flat_plain, flat_jittered = plain.flatten(2), jittered.flatten(2)
        # per chip and band, gain in 1 +- 0.3 and offset in +- 0.3: an exact affine map of the plain chip
        gain = (flat_jittered[..., 1:] - flat_jittered[..., :1]) / (flat_plain[..., 1:] - flat_plain[..., :1])
        spread = flat_plain[..., 1:] - flat_plain[..., :1]
        median_gain = torch.stack([g[s.abs() > 0.5].median() for g, s in zip(gain.flatten(0, 1), spread.flatten(0, 1))])
        assert ((median_gain - 1).abs() <= 0.3 + 1e-4).all() and median_gain.std() > 0.01


def test_ndvi_band_is_appended_from_the_raw_values_behind_the_normalised_bands():
    raw, _, _, _ = developed_scene(2)
    mean, std = [110.0, 120.0, 90.0, 160.0], [40.0, 45.0, 35.0, 50.0]

    def normalised(pixels):
        return (pixels - torch.tensor(mean).view(1, 4, 1, 1)) / torch.tensor(std).view(1, 4, 1, 1)

    band = NdviBand(red=0, nir=3, mean=mean, std=std)
    with_ndvi = band(normalised(raw))
    assert with_ndvi.shape == (1, 5, 96, 96) and torch.equal(with_ndvi[:, :4], normalised(raw))
    assert torch.allclose(with_ndvi[:, 4], (ndvi(raw, 0, 3) - 0.2) / 0.2, atol=1e-4)
    # a darker flight (every band x 0.7) darkens the bands, not the index
    darker = band(normalised(0.7 * raw))
    assert torch.allclose(darker[:, 4], with_ndvi[:, 4], atol=1e-4)
    assert (darker[:, :4] - with_ndvi[:, :4]).abs().mean() > 0.5


def test_ndvi_members_see_15_features_and_restore_from_their_state():
    raw, codes, label, truth = developed_scene(3)
    band = NdviBand(0, 3, [120.0] * 4, [50.0] * 4)
    image = (raw - 120) / 50
    members = [fit_local_model([(image, label)], classes=5, balance=1.0, seed=seed, ndvi=band)[0] for seed in (0, 1)]
    assert members[0].features(image).shape[1] == 15 and members[0].net[0].in_channels == 15
    assert torch.allclose(members[0].features(image), local_features(band(image)))
    bag = BaggedLabelModel(members)
    plain = BaggedLabelModel([fit_local_model([(image, label)], classes=5, balance=1.0, seed=0)[0]] * 2)
    assert bag.state_dict().keys() == plain.state_dict().keys()  # the constants are the dataset's, not state
    restored = BaggedLabelModel.empty(4, 5, 2, ndvi=NdviBand(0, 3, [120.0] * 4, [50.0] * 4))
    restored.load_state_dict(bag.state_dict())
    assert torch.equal(restored(image), bag(image))
    allowed = np.zeros((100, 5), dtype=bool)
    allowed[41, [TREE, GRASS]] = allowed[21, [TREE, GRASS]] = True
    refined = LabelRefiner(bag, allowed, torch.device("cpu"))(image, codes, label)
    assert (refined == truth)[truth != IMPERVIOUS].float().mean() > 0.9
