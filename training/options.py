"""Settings of a training run (``train.py``), each declared once with its default, help and check.

A checkpoint stores them (``train_args``); a resumed run must repeat the :data:`SCHEDULE_OPTIONS`,
except that a larger ``--max_epochs`` extends it.
"""

from __future__ import annotations

import dataclasses
import os

from dataset.errors import InputError
from dataset.options import (
    TileListOptions,
    at_least,
    between,
    multiple_of,
    option,
    override,
    positive_number,
    seed_range,
)
from networks.config import CONFIG_NAMES, SIZE_MULTIPLE
from runtime.device import DeviceOptions

#: Options that define the data, the model, the loss and the schedule: a resumed run must use the same,
#: but for ``max_epochs``, which may grow (the poly schedule is then re-planned; training.run_folder).
#: (The model config is compared as a whole.)
SCHEDULE_OPTIONS = ("max_epochs", "batch_size", "base_lr", "seed", "chip_size", "chips_per_tile", "chip_retries",
                    "focus_chips", "label_loss", "mix_cell", "gce_q", "focal_gamma", "entropy_weight", "augment",
                    "jitter", "class_balance", "optimizer", "refine_labels", "refine_targets", "refine_balance",
                    "refine_seeds", "refine_jitter", "refine_features")


def exponent_in_unit_interval(value: float) -> str | None:
    return None if 0 < value <= 1 else "must be in (0, 1]"


#: Named presets of the recipe options; an option given on the command line wins over its preset.
#: "published" is the published recipe; "robust" makes the 1 m map beat its LR labels (docs/training.md
#: gives each option's measured effect).
RECIPES = {
    "published": {"label_loss": "hard", "entropy_weight": 0.0, "augment": "none", "jitter": 0.0,
                  "class_balance": 0.0, "optimizer": "sgd", "refine_labels": "none", "refine_seeds": 0.0,
                  "refine_jitter": 0.0, "refine_features": "bands", "focus_chips": 0.0, "guided_filter": 0,
                  "label_model_weight": 0.0},
    "robust": {"label_loss": "focal", "entropy_weight": 0.0, "augment": "d4", "jitter": 0.0,
               "class_balance": 0.75, "optimizer": "sgd", "refine_labels": "local", "refine_seeds": 0.1,
               "refine_jitter": 0.08, "refine_features": "ndvi", "focus_chips": 0.25, "guided_filter": 4,
               "label_model_weight": 1.0},
}


def value_before_option_existed(name: str) -> object:
    """What a run trained with before option ``name`` was added: its published-recipe value, else its
    default. A checkpoint written then has no entry for it; a resumed run compares with this."""
    if name in RECIPES["published"]:
        return RECIPES["published"][name]
    return next(f.default for f in dataclasses.fields(TrainOptions) if f.name == name)


@dataclasses.dataclass(kw_only=True)
class TrainOptions(DeviceOptions, TileListOptions):
    """Every setting of a training run."""

    dataset: str | None = override("Chesapeake")
    chip_size: int = option(224, "training chip side in pixels, a multiple of 32", group="data",
                            check=multiple_of(SIZE_MULTIPLE))
    chips_per_tile: int = option(50, "random chip positions drawn per tile per epoch", group="data",
                                 check=at_least(1))
    chip_retries: int = option(0, "extra draws in place of a chip with no-data; 0 skips it as published",
                               group="data", check=at_least(0))
    num_workers: int = option(
        help="data loader processes per training process (default: 8 as published, at most the number of CPUs)",
        default_factory=lambda: min(8, os.cpu_count() or 1), group="data", check=at_least(0))
    skip_label_scan: bool = option(False, "do not read every label up front to check its codes (they are still "
                                          "checked chip by chip)", group="data")

    max_epochs: int = option(100, "epochs", group="optimisation", check=at_least(1))
    batch_size: int = option(2, "chips per optimiser step per process, at least 2 (BatchNorm needs two samples)",
                             group="optimisation", check=at_least(2))
    base_lr: float = option(0.01, "SGD learning rate before the poly decay; multiplied by batch/24 when the batch "
                                  "is a multiple of 6 other than 24, as published", group="optimisation",
                            check=positive_number)
    seed: int = option(1234, "seed of every random draw", group="optimisation", check=seed_range)
    aux_loss: bool = option(False, "add the auxiliary FCN head and its loss (weight 0.4); off as published",
                            group="optimisation")

    recipe: str = option("published", "training recipe preset: published (the paper's), or robust (measured to "
                                      "beat the LR labels on held-out patches, see docs/training.md); sets the "
                                      "recipe options below that are not given", choices=tuple(RECIPES),
                         group="recipe")
    focus_chips: float | None = option(None, "share of the chips of a tile holding the LR codes whose class mix "
                                             "includes the dataset's non_vegetated_class (NLCD: 21-24 developed, 31 "
                                             "barren) that are centred on a random pixel of those codes, so that the "
                                             "rare lawns, roads and roofs of developed blocks are seen more often; 0 "
                                             "draws every chip uniformly as published (see docs/training.md)",
                                       group="recipe", check=between(0, 1), none_means="the recipe's")
    label_loss: str | None = option(None, "hard: the published dual cross-entropy on the LR majority class; mix: "
                                          "each LR pixel's predicted class mix must match its code's mix (the "
                                          "dataset's lr_mixes); gce: the dual loss with the noise-robust generalised "
                                          "cross-entropy; focal: the dual loss with the focal loss",
                                    choices=("hard", "gce", "focal", "mix"), group="recipe",
                                    none_means="the recipe's")
    mix_cell: int = option(30, "with --label_loss mix: side in pixels of the cells within which the pixels of one LR "
                               "code are pooled (about one LR pixel)", group="recipe", check=at_least(1))
    gce_q: float = option(0.7, "with --label_loss gce: the exponent q in (0, 1]; small is close to cross-entropy, 1 "
                               "is the mean absolute error", group="recipe", check=exponent_in_unit_interval)
    focal_gamma: float = option(1.0, "with --label_loss focal: the exponent gamma > 0 of (1 - p) ** gamma, which "
                                      "weighs down the pixels already predicted well", group="recipe",
                                check=positive_number)
    entropy_weight: float | None = option(None, "weight of the mean per-pixel prediction entropy added to the loss "
                                                "(commits each pixel to one class)", group="recipe",
                                          check=at_least(0), none_means="the recipe's")
    augment: str | None = option(None, "none, or d4: random flips and 90-degree rotations of each chip",
                                 choices=("none", "d4"), group="recipe", none_means="the recipe's")
    jitter: float | None = option(None, "photometric jitter: a random gain in 1 +- S and offset in +- S (in units of "
                                        "the band's spread) per chip and band; 0 is off", group="recipe",
                                  check=at_least(0), none_means="the recipe's")
    optimizer: str | None = option(None, "sgd (published: momentum 0.9, weight decay 1e-4) or adamw (same weight "
                                         "decay, decoupled); --base_lr is its learning rate before the poly decay",
                                   choices=("sgd", "adamw"), group="recipe", none_means="the recipe's")
    class_balance: float | None = option(None, "weigh each class by (its share of the training LR labels) ** -P, "
                                               "so rare classes count; 0 is off, 0.5 the square-root balance",
                                         group="recipe", check=at_least(0), none_means="the recipe's")

    refine_labels: str | None = option(None, "none, or local: train on the LR labels refined by a per-pixel "
                                             "classifier of local appearance fitted to them at start-up (needs the "
                                             "dataset's lr_mixes; see docs/training.md)", choices=("none", "local"),
                                       group="recipe", none_means="the recipe's")
    refine_targets: str = option("hard", "with --refine_labels local: what the local classifier is fitted to: hard (each "
                                         "LR code's class) or mix (each code's class mix, the dataset's lr_mixes: it "
                                         "can then find the minority classes, such as the roads of a developed block)",
                                 choices=("hard", "mix"), group="recipe")
    refine_balance: float = option(1.0, "with --refine_labels local: class balance P of the local classifier "
                                        "(share ** -P; 1 weighs every class equally in total)", group="recipe",
                                   check=at_least(0))
    refine_seeds: float | None = option(None, "with --refine_labels local: before the local classifier is fitted, "
                                              "in each of its chips the lowest-NDVI pixels of each LR code, this share "
                                              "of the code's expected non-vegetated share (lr_mixes), are labelled the "
                                              "dataset's non_vegetated_class (roads, roofs, bare ground); 0 is off. "
                                              "Needs red and nir bands", group="recipe", check=between(0, 1),
                                        none_means="the recipe's")
    refine_jitter: float | None = option(None, "with --refine_labels local: the local classifiers are fitted on chips "
                                               "with photometric jitter of this strength (as --jitter: a random gain "
                                               "in 1 +- S and offset in +- S per chip and band), so that they tell "
                                               "classes apart by more than one flight's colours; 0 is off",
                                         group="recipe", check=at_least(0), none_means="the recipe's")
    refine_features: str | None = option(None, "with --refine_labels local: what the local classifiers see of each "
                                               "pixel: bands (each band, and its mean and spread over the 11 x 11 "
                                               "neighbourhood) or ndvi (the same with NDVI as one more band, which a "
                                               "brighter or darker flight moves less; needs red and nir bands)",
                                         choices=("bands", "ndvi"), group="recipe", none_means="the recipe's")
    guided_filter: int | None = option(None, "radius R of the image-guided filter of each chip's class "
                                             "probabilities when the checkpoint maps (test.py, validation): they then "
                                             "follow the image's edges; stored in the checkpoint, does not change "
                                             "training; 0 is off", group="recipe", check=at_least(0),
                                       none_means="the recipe's")
    label_model_weight: float | None = option(None, "with --refine_labels local: when the checkpoint maps (test.py, "
                                                    "validation), the label-refinement classifiers' log-probabilities, "
                                                    "times this weight, are added to the network's logits (a product of "
                                                    "experts: the network's wide view and their 11 x 11 one); stored in "
                                                    "the checkpoint, does not change training; 0 maps with the network "
                                                    "alone", group="recipe", check=at_least(0),
                                              none_means="the recipe's")

    model_config: str = option("vcnet", "model size: vcnet (published), vcnet_normal (width 128), tiny (tests and "
                                        "smoke runs)", choices=CONFIG_NAMES, group="model")
    CNN_width: int | None = option(None, "L2HNet width: 64 light (published) or 128 normal", group="model",
                                   check=at_least(1), none_means="the --model_config's, 64 for vcnet")
    pretrained: str | None = option(None, "DeiT-tiny weights for the 12 transformer blocks: a file path, or "
                                          "deit_tiny_patch16_224 to download the DeiT release's file once into the "
                                          "torch hub cache (sha256 checked)", group="model",
                                    none_means="random initialisation")

    out_dir: str = option("runs/vcnet", "folder for checkpoints, train.log and tensorboard/", aliases=("--savepath",),
                          group="run")
    save_interval: int = option(20, "write epoch_N.pth every this many epochs from the first, and after the last; "
                                    "last.pth is written every epoch", group="run", check=at_least(1))
    resume: str | None = option(None, "continue from a training checkpoint (OUT_DIR/last.pth) with the same "
                                      "settings; a larger --max_epochs extends the run", group="run")
    overwrite: bool = option(False, "start afresh in an OUT_DIR that holds a run", group="run")
    deterministic: bool = option(False, "deterministic kernels where PyTorch has them, cuDNN benchmark off (slower; "
                                 "on CUDA still not bit-exact, see docs/training.md; published: off)",
                                 group="run")
    log_interval: int = option(10, "steps between TensorBoard points and progress-bar updates", group="run",
                               check=at_least(1))

    val_list: str | None = option(None, "CSV with image_fn,hr_label_fn: map these tiles and log OA / mIoU against "
                                        "the HR reference every --val_interval epochs and after the last",
                                  group="validation (optional)")
    val_interval: int = option(10, "epochs between validations", group="validation (optional)", check=at_least(1))

    def __post_init__(self) -> None:
        for name, value in RECIPES.get(self.recipe, {}).items():
            if getattr(self, name) is None:
                setattr(self, name, value)

    def check(self) -> None:
        if self.model_config not in CONFIG_NAMES:
            raise InputError(f"--model_config {self.model_config!r}: choose one of {list(CONFIG_NAMES)}")
        if self.label_model_weight and self.refine_labels != "local":
            raise InputError(f"--label_model_weight {self.label_model_weight:g}: the maps' vote comes from the label "
                             "refinement's classifiers, which only --refine_labels local fits; --label_model_weight 0 "
                             "turns it off")
        super().check()
