"""The parts of a Stage spec: data, split, optimiser, augmentation, MoCo and corners settings (pydantic).

Every spec forbids unknown keys, so a typo in a stage file is an error naming the key.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

from chextrain.data.transforms import PhotoSim, StandardAugment


class Spec(BaseModel):
    """Base of every spec: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class BudgetSpec(Spec):
    """Fixed-budget sampling: `digital` x-rays + `total - digital` photos from the train split."""

    total: int = Field(gt=0)
    digital: int = Field(ge=0)
    seed: int | None = None  # None: the stage's seed

    @model_validator(mode="after")
    def _digital_within_total(self) -> BudgetSpec:
        if self.digital > self.total:
            raise ValueError(f"digital ({self.digital}) must be <= total ({self.total})")
        return self


Kind = Literal["digital", "natural", "synthetic-digital", "synthetic-photographic", "film"]


class DataSpec(Spec):
    """Which catalog rows train the stage, and where its prepared images live.

    store: a folder for the prepared image store (data/store.py), shared by every stage that names
    it; None decodes the files in the loader workers. The store holds the very bytes decoding
    gives, so it changes speed only: it is left out of the resolved config and the config hash.
    """

    train: list[Literal["chexpert", "chexphoto", "other"]] = Field(default=["chexpert"], min_length=1)
    kinds: list[Kind] | None = None
    budget: BudgetSpec | None = None
    store: str | None = Field(default=None, exclude=True)
    # the release folder to read of a dataset found twice under the data root (CheXpert-v1.0-small
    # with CheXpert-v1.0): data.catalog.read_catalog(releases=...); other datasets are read as found
    releases: list[str] | None = Field(default=None, min_length=1)

    @model_serializer(mode="wrap")
    def _without_unset_releases(self, handler: Any) -> Any:
        """Leave `releases: null` out of the dump, so the config hash of every stage without it stays."""
        data = handler(self)
        if self.releases is None and isinstance(data, dict):
            data.pop("releases", None)
        return data


class SplitSpec(Spec):
    """How `splits.assign_splits` carves validation out of the official train files."""

    by: Literal["patient", "image"] = "patient"
    val_fraction: float = Field(default=0.1, gt=0.0, lt=1.0)
    seed: int = 0
    frontal_only: bool = False


class OptimizerSpec(Spec):
    """The stage's own optimiser: never inherited from the stage it starts from."""

    name: Literal["adam", "sgd", "adamw"] = "adam"
    lr: float = Field(default=1.0e-4, gt=0.0)
    weight_decay: float = Field(default=0.0, ge=0.0)
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0)  # sgd only


class StandardSpec(Spec):
    """Small geometric and intensity jitter (see transforms.StandardAugment)."""

    rotation: float = Field(default=10.0, ge=0.0, le=180.0)  # degrees, +-
    scale: tuple[float, float] = (0.9, 1.1)
    translate: float = Field(default=0.05, ge=0.0, lt=1.0)  # fraction of the side, +-
    brightness: float = Field(default=0.1, ge=0.0, lt=1.0)
    contrast: float = Field(default=0.1, ge=0.0, lt=1.0)


class PhotoSimSpec(Spec):
    """On-the-fly photo simulation (data/photo.py) with probability p."""

    p: float = Field(default=0.5, ge=0.0, le=1.0)
    recipe: Literal["digital", "photographic", "phone"] = "phone"
    level: int = Field(default=1, ge=1, le=4)


class AugmentSpec(Spec):
    """Training augmentation; YAML accepts `none`, `standard`, `photo_sim` or a mapping."""

    standard: StandardSpec | None = None
    photo_sim: PhotoSimSpec | None = None

    def build(self) -> list[PhotoSim | StandardAugment]:
        """The callables in the order they apply: photo simulation first (it photographs the film)."""
        out: list[PhotoSim | StandardAugment] = []
        if self.photo_sim is not None:
            out.append(PhotoSim(**self.photo_sim.model_dump()))
        if self.standard is not None:
            out.append(StandardAugment(**self.standard.model_dump()))
        return out


class MocoCxrSpec(Spec):
    """MoCo-CXR's views: a conservative random resized crop, a small rotation, a flip; no colour jitter.

    MoCo-CXR (Sowrirajan et al. 2021) crops a 320 px square out of an image resized to 320 px on
    its short side (about 0.8 of a CheXpert image's area), rotates by up to 10 degrees and flips.
    """

    crop_scale: tuple[float, float] = (0.8, 1.0)  # fraction of the image area a crop keeps
    rotation: float = Field(default=10.0, ge=0.0, le=180.0)  # degrees, +-
    flip: float = Field(default=0.5, ge=0.0, le=1.0)  # probability of a horizontal flip

    @field_validator("crop_scale")
    @classmethod
    def _scale_in_unit(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0.0 < value[0] <= value[1] <= 1.0:
            raise ValueError(f"{list(value)}: expected 0 < low <= high <= 1")
        return value


class PhotoAwareSpec(Spec):
    """With probability p the second view is a photo of the x-ray: a real CheXphoto photo of the same
    patient/study/image from the train split when `real_pairs` and one exists, else one simulated
    with data/photo.py's `recipe` at `level`."""

    p: float = Field(default=0.5, ge=0.0, le=1.0)
    recipe: Literal["digital", "photographic", "phone"] = "phone"
    level: int = Field(default=1, ge=1, le=4)
    real_pairs: bool = True


class MocoAugmentSpec(Spec):
    """How a MoCo stage makes its two views; YAML accepts `mococxr`, `photo_aware`, a list or a mapping."""

    mococxr: MocoCxrSpec | None = MocoCxrSpec()
    photo_aware: PhotoAwareSpec | None = None


class MocoSpec(Spec):
    """MoCo v2 settings of an `objective: moco` stage (the optimiser is the stage's `optimizer`:
    MoCo v2 used `{name: sgd, lr: 0.03, momentum: 0.9, weight_decay: 1.0e-4}`, MoCo-CXR Adam)."""

    queue_size: int = Field(default=65536, gt=0)  # negatives kept; MoCo's 65,536, a few hundred for the demo
    momentum: float = Field(default=0.999, ge=0.0, le=1.0)  # key encoder EMA
    temperature: float = Field(default=0.2, gt=0.0)
    proj_dim: int = Field(default=128, gt=0)
    hidden_dim: int | None = Field(default=None, gt=0)  # None: the encoder's feature width (MoCo v2)
    schedule: Literal["cosine", "none"] = "cosine"
    shuffle_bn: bool = True  # under DDP: shuffle the key batch across processes (MoCo's shuffle-BN)
    augmentation: MocoAugmentSpec = MocoAugmentSpec()

    @field_validator("augmentation", mode="before")
    @classmethod
    def _augmentation_shorthand(cls, value: Any) -> Any:
        if value is None or value == "none":
            return {"mococxr": None}
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list):
            if not all(v in ("mococxr", "photo_aware") for v in value):
                raise ValueError(f"{value!r}: expected none, mococxr, photo_aware or a mapping of them")
            return {
                "mococxr": {} if "mococxr" in value else None,
                "photo_aware": {} if "photo_aware" in value else None,
            }
        if isinstance(value, Mapping):
            return {k: ({} if v is True else None if v is False else v) for k, v in value.items()}
        return value


class CornersSpec(Spec):
    """How the `corners` objective makes its training photos (training/objectives/corners.py).

    Each x-ray of the stage's rows becomes a fresh simulated photo every epoch, whose corners
    the photo simulation knows: a recipe of `recipes` at a level of `levels`, padded first onto
    a black 3:4 screen with probability `canvas` (as the demo's natural photos), left as it is
    (corners = the frame) with probability `plain`, its screen blank (no radiograph: the
    confidence must be 0) with probability `negatives`. Photos with CheXphoto v1.1 corner labels
    among the rows train as they are when `labelled`. The confidence output learns whether the
    corners are right within `tolerance` of the diagonal. `eval_photos` held-out simulated photos
    (of the val x-rays) measure the model against the classical finder when it finishes, and
    choose the bundle's `min_confidence` (below it rectify falls back to the classical finder)
    as the one that gives find_quad the smallest error there, unless the stage sets it.
    """

    recipes: list[Literal["phone", "photographic", "digital"]] = Field(default=["phone"], min_length=1)
    levels: list[Literal[1, 2, 3, 4]] = Field(default=[1, 2, 3], min_length=1)
    canvas: float = Field(default=0.5, ge=0.0, le=1.0)
    plain: float = Field(default=0.05, ge=0.0, le=1.0)
    negatives: float = Field(default=0.05, ge=0.0, le=1.0)
    labelled: bool = True
    tolerance: float = Field(default=0.08, gt=0.0, lt=1.0)
    min_confidence: float | None = Field(default=None, ge=0.0, le=1.0)
    eval_photos: int = Field(default=64, ge=0)


class ResourcesSpec(Spec):
    """What a stage asks SLURM for (`--executor slurm`). None of it changes the result: not hashed.

    Nodes are the stage's `num_nodes`; GPUs per node default to the stage's `devices` (when a whole
    number), else 1. One task runs per GPU, as Lightning's SLURM environment expects.
    """

    partition: str | None = None
    gpus_per_node: int | None = Field(default=None, ge=0)
    cpus_per_task: int = Field(default=8, gt=0)
    mem_gb: int | None = Field(default=None, gt=0)
    time_min: int = Field(default=24 * 60, gt=0)
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None


LOGGER_NAMES: tuple[str, ...] = ("tensorboard", "csv", "mlflow", "wandb")


class NoOptions(Spec):
    """A logger with nothing to set (tensorboard, csv: files under STAGE/logs/)."""


class MlflowSpec(Spec):
    """Where MLflow logs (training/loggers.py). Needs `chextrain[mlflow]`."""

    tracking_uri: str | None = None  # None: sqlite:///<study folder, else stage folder>/mlflow.db
    experiment: str | None = None  # None: the study's name, or "chextrain"


class WandbSpec(Spec):
    """Weights & Biases through Lightning's WandbLogger. Needs `chextrain[wandb]`."""

    project: str = "chextrain"
    entity: str | None = None
    offline: bool = True  # offline: no network; `wandb sync STAGE/logs/wandb/...` uploads later


class LoggerSpec(Spec):
    """The stage's experiment loggers (default: tensorboard and csv); YAML: see `logger_shorthand`."""

    tensorboard: NoOptions | None = NoOptions()
    csv: NoOptions | None = NoOptions()
    mlflow: MlflowSpec | None = None
    wandb: WandbSpec | None = None

    @property
    def names(self) -> list[str]:
        """The loggers in use, in LOGGER_NAMES order."""
        return [name for name in LOGGER_NAMES if getattr(self, name) is not None]


def logger_shorthand(value: Any) -> Any:
    """A stage's `logger:` as LoggerSpec data: `none`, a name, a list of names, or a mapping of
    name -> options (`true` for none) that lists every logger in use."""
    if value is None or value == "none":
        value = []
    if isinstance(value, str):
        value = [value]
    if isinstance(value, list):
        unknown = [v for v in value if v not in LOGGER_NAMES]
        if unknown:
            raise ValueError(f"{unknown}: expected names from {list(LOGGER_NAMES)}")
        return {name: ({} if name in value else None) for name in LOGGER_NAMES}
    if isinstance(value, Mapping):
        unset = {name: None for name in LOGGER_NAMES if name not in value}
        return unset | {k: ({} if v is True else None if v is False else v) for k, v in value.items()}
    return value
