"""A training stage as data: the pydantic spec validated from YAML, overrides, and its config hash.

A strategy of the paper differs from another only in where its weights come from, what data
trains it, what is frozen and which head learns; a `Stage` says exactly that. Defaults are the
paper's hyperparameters (DenseNet-121 from ImageNet, U-Ones, Adam 1e-4, batch 16, 3 epochs, 320 px).

`Stage` is a union discriminated by `objective` (default `supervised`): each objective has its own
stage type (`SupervisedStage`, `MocoStage`, `CornersStage`), so a key that does not apply to the
stage's objective (`augment` on a MoCo stage, `moco:` on a supervised one) is refused when the
YAML is read.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    Discriminator,
    Field,
    StringConstraints,
    Tag,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from chextrain.data.transforms import Preprocessing
from chextrain.errors import ChextrainError
from chextrain.labels import resolve_policy
from chextrain.models.net import check_backbone
from chextrain.training.specs import (
    AugmentSpec,
    CornersSpec,
    DataSpec,
    LoggerSpec,
    MocoSpec,
    OptimizerSpec,
    ResourcesSpec,
    Spec,
    SplitSpec,
    logger_shorthand,
)
from chextrain.training.stage_errors import format_errors, related

PRECISIONS: tuple[str, ...] = ("auto", "32-true", "16-mixed", "bf16-mixed", "64-true")
_PRECISION_ALIASES: dict[str, str] = {
    "32": "32-true",
    "16": "16-mixed",
    "bf16": "bf16-mixed",
    "64": "64-true",
}
REF_PREFIX = "stage:"
# Keys that change neither the weights nor the outputs: left out of the config hash.
HASH_EXCLUDE: tuple[str, ...] = ("label", "num_workers", "resources", "keep_checkpoints", "logger")
KEEP_CHECKPOINTS: tuple[str, ...] = ("last", "best", "all", "none")


HeadName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z][A-Za-z0-9_]*$")]


class StageError(ChextrainError):
    """A stage file or override is invalid; the message lists every bad field."""


class BaseStage(Spec):
    """What every stage has, whatever its objective. Field names are the YAML keys."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    label: str | None = None  # strategy name printed in tables; defaults to name
    init: str = "imagenet"  # imagenet | random | FILE | run folder | stage:NAME
    backbone: str = "densenet121"
    data: DataSpec = DataSpec()
    split: SplitSpec = SplitSpec()
    optimizer: OptimizerSpec = OptimizerSpec()
    epochs: int | None = Field(default=3, gt=0)
    max_steps: int | None = Field(default=None, gt=0)
    batch_size: int = Field(default=16, gt=0)
    image_size: int = Field(default=320, ge=16)
    preprocessing: Preprocessing = Preprocessing()
    precision: str = "auto"
    devices: int | Literal["auto"] = "auto"
    num_nodes: int = Field(default=1, gt=0)
    seed: int = 0
    checkpoint_every_n_steps: int = Field(default=1000, gt=0)
    num_workers: int | Literal["auto"] = "auto"
    resources: ResourcesSpec | None = None  # SLURM resources (executors.py); not hashed
    # What a finished stage keeps besides its bundle: checkpoints/last.ckpt, best.ckpt, all, none.
    keep_checkpoints: Literal["last", "best", "all", "none"] = "last"
    logger: LoggerSpec = LoggerSpec()  # tensorboard, csv, mlflow, wandb (training/loggers.py)

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, value: str) -> str:
        return check_backbone(value)  # a name of BACKBONES, or timm:NAME

    @field_validator("preprocessing", mode="before")
    @classmethod
    def _preprocessing_name(cls, value: Any) -> Any:
        # `preprocessing: imagenet` (or histeq): a bare name. Set or not, see lifecycle.apply_expected_input.
        return {"name": value} if isinstance(value, str) else value

    @field_validator("logger", mode="before")
    @classmethod
    def _logger_names(cls, value: Any) -> Any:
        return logger_shorthand(value)

    @field_validator("precision", mode="before")
    @classmethod
    def _known_precision(cls, value: Any) -> str:
        text = _PRECISION_ALIASES.get(str(value), str(value))
        if text not in PRECISIONS:
            raise ValueError(f"{value!r} is not one of {list(PRECISIONS)} (or 32, 16, bf16)")
        return text

    @field_validator("devices", "num_workers", mode="before")
    @classmethod
    def _auto_or_count(cls, value: Any) -> Any:
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
            return value
        raise ValueError(f"{value!r}: expected 'auto' or a whole number >= 0")

    @model_validator(mode="before")
    @classmethod
    def _renamed_and_implied_keys(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        if "preprocess" in data:  # the key's old name, still read
            if "preprocessing" in data:
                raise ValueError("preprocess: an old name of `preprocessing`; give only `preprocessing`")
            warnings.warn(
                "stage key `preprocess` is deprecated: write `preprocessing`", FutureWarning, stacklevel=2
            )
            data = {("preprocessing" if k == "preprocess" else k): v for k, v in data.items()}
        # `max_steps` alone means "train for that many steps", not "3 epochs or that many steps".
        if data.get("max_steps") is not None and "epochs" not in data:
            data = {**data, "epochs": None}
        return data

    @model_validator(mode="after")
    def _common_checks(self) -> BaseStage:
        problems = []
        if self.devices == 0:
            problems.append("devices: must be >= 1 or 'auto'")
        if self.epochs is None and self.max_steps is None:
            problems.append("epochs / max_steps: give at least one")
        problems += self._problems()
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def _problems(self) -> list[str]:
        """Cross-field problems of the objective's own fields (one "field: problem" each)."""
        return []

    @property
    def title(self) -> str:
        """The strategy name for tables."""
        return self.label or self.name


class SupervisedStage(BaseStage):
    """A stage that trains heads on labelled images (every strategy of the paper's Table 1)."""

    objective: Literal["supervised"] = "supervised"
    policy: str | dict[str, str] = "ones"
    heads: list[HeadName] = Field(default=["shared"], min_length=1)
    domain_heads: dict[Literal["digital", "photo"], str] = {"digital": "shared", "photo": "shared"}
    train_heads: list[HeadName] = Field(default=["shared"], min_length=1)
    router: bool = False
    freeze: Literal["none", "encoder", "last-block"] = "none"
    augment: AugmentSpec = AugmentSpec()
    val_every_n_steps: int | None = Field(default=None, gt=0)  # None: once per epoch
    monitor: str = "val/auc_mean"
    monitor_mode: Literal["max", "min"] = "max"
    select: Literal["last", "best"] = "last"  # which weights go into the bundle
    evaluate: list[Literal["val", "test", "holdout"]] = ["val", "test"]  # holdout: test_labels.csv

    @field_validator("policy")
    @classmethod
    def _known_policy(cls, value: str | dict[str, str]) -> str | dict[str, str]:
        resolve_policy(value)  # raises ValueError naming the bad entry
        return value

    @field_validator("augment", mode="before")
    @classmethod
    def _augment_shorthand(cls, value: Any) -> Any:
        if value is None or value == "none":
            return {}
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list):
            if not all(v in ("standard", "photo_sim") for v in value):
                raise ValueError(f"{value!r}: expected none, standard, photo_sim or a mapping of them")
            return {v: {} for v in value}
        if isinstance(value, Mapping):
            return {k: ({} if v is True else v) for k, v in value.items() if v is not False}
        return value

    @field_validator("heads", "train_heads")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"{value}: names must be unique")
        return value

    def _problems(self) -> list[str]:
        problems = []
        for domain, head in self.domain_heads.items():
            if head not in self.heads:
                problems.append(f"domain_heads.{domain}: {head!r} is not one of heads {self.heads}")
        allowed = [*self.heads, *(["router"] if self.router else [])]
        for head in self.train_heads:
            if head not in allowed:
                problems.append(f"train_heads: {head!r} is not one of {allowed}")
        if "router" in self.heads:
            problems.append("heads: 'router' is reserved for the domain router (set router: true)")
        return problems


class MocoStage(BaseStage):
    """A MoCo v2 pre-training stage: learns an encoder from unlabelled views (its `moco:` settings)."""

    objective: Literal["moco"]
    moco: MocoSpec = MocoSpec()


class CornersStage(BaseStage):
    """A stage that trains the corner network of chextrain.rectify (the four corners + a confidence).

    Defaults suit a small network from scratch: the `tiny` backbone, random init, 128 px, Adam 1e-3.
    """

    objective: Literal["corners"]
    init: str = "random"
    backbone: str = "tiny"
    image_size: int = Field(default=128, ge=16)
    batch_size: int = Field(default=32, gt=0)
    optimizer: OptimizerSpec = OptimizerSpec(lr=1.0e-3)
    corners: CornersSpec = CornersSpec()


# The stage type of each objective (training/objectives/ holds the code that runs it).
STAGE_TYPES: dict[str, type[BaseStage]] = {
    "supervised": SupervisedStage,
    "moco": MocoStage,
    "corners": CornersStage,
}


def _objective_of(value: Any) -> str | None:
    if isinstance(value, BaseStage):
        return str(value.objective)  # type: ignore[attr-defined]
    if isinstance(value, Mapping):
        name = value.get("objective", "supervised")
        return name if name in STAGE_TYPES else None
    return None


Stage = Annotated[
    Annotated[SupervisedStage, Tag("supervised")]
    | Annotated[MocoStage, Tag("moco")]
    | Annotated[CornersStage, Tag("corners")],
    Discriminator(
        _objective_of,
        custom_error_type="objective",
        custom_error_message=f"objective: expected one of {list(STAGE_TYPES)}",
    ),
]
_STAGE_ADAPTER: TypeAdapter[Any] = TypeAdapter(Stage)


def resolved_config(stage: Stage) -> dict[str, Any]:
    """The stage with every default filled in, as plain JSON-able data (what config.yaml holds)."""
    return stage.model_dump(mode="json")


def config_hash(stage: Stage, refs: Mapping[str, str] | None = None) -> str:
    """A stable hash of what determines the stage's result.

    Args:
        stage: the stage.
        refs: optional {stage name: its config hash} of referenced stages, so that a change
            upstream changes this hash too (the study runner passes them).
    """
    config = {k: v for k, v in resolved_config(stage).items() if k not in HASH_EXCLUDE}
    payload = {"config": config, "refs": dict(sorted((refs or {}).items()))}
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of `data` with `key.sub=value` overrides applied (values parsed as YAML)."""
    out = json.loads(json.dumps(dict(data)))  # deep copy of plain data
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise StageError(f"override {item!r}: expected key.sub=value")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise StageError(f"override {item!r}: value is not valid YAML ({err})") from err
        parts = key.strip().split(".")
        node = out
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                where = ".".join(parts[: depth + 1])
                raise StageError(f"override {item!r}: {where} is {child!r}, not a mapping")
            node = child
        node[parts[-1]] = value
    return out


def parse_stage(data: Any, overrides: Sequence[str] = (), *, source: str = "stage") -> Stage:
    """Validate plain data (a YAML mapping) into a Stage, or raise StageError listing every problem.

    A problem at an override's key is said to come from it (`(from --set KEY=VALUE)`), and when
    every problem does, the override is named instead of `source`.
    """
    if not isinstance(data, Mapping):
        raise StageError(f"{source}: expected a mapping of stage keys, got {type(data).__name__}")
    data = apply_overrides(data, overrides)
    try:
        return _STAGE_ADAPTER.validate_python(data)
    except ValidationError as err:
        raise StageError(
            format_errors(err.errors(), source, data, STAGE_TYPES, overrides=overrides)
        ) from None


def check_overrides(overrides: Sequence[str]) -> None:
    """Each `key.sub=value` override alone must be valid for at least one stage type.

    Checked on its own (a stage with just a name and the override), so the error names the
    override whatever file it is applied to, and a study can check its overrides once.
    """
    for item in overrides:
        data = apply_overrides({}, [item])
        path = tuple(item.partition("=")[0].strip().split("."))
        objective = data.get("objective")
        if objective is not None and objective not in STAGE_TYPES:
            raise StageError(f"--set {item}: objective: expected one of {list(STAGE_TYPES)}")
        found: list[tuple[type[BaseStage], list[Any]]] = []
        for name, model in STAGE_TYPES.items():
            if objective not in (None, name):
                continue
            try:
                model.model_validate({"name": "x", **data, "objective": name})
                break  # valid for this stage type
            except ValidationError as err:
                mine = [e for e in err.errors() if related(tuple(e["loc"]), path)]
                if not mine:
                    break
                found.append((model, mine))
        else:
            model, errors = next(((m, e) for m, e in found if path[0] in m.model_fields), found[0])
            raise StageError(format_errors(errors, f"--set {item}", data, STAGE_TYPES, model))


def read_yaml(path: str | Path, what: str = "stage") -> Any:
    """The plain data of a YAML file; StageError naming the file when it cannot be read or parsed."""
    path = Path(path)
    try:
        return yaml.safe_load(path.read_text())
    except OSError as err:
        raise StageError(f"cannot read {what} file {path}: {err.strerror}") from err
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        reason = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise StageError(f"{path}{where}: not valid YAML ({reason})") from err


def load_stage(path: str | Path, overrides: Sequence[str] = ()) -> Stage:
    """Read a stage YAML file, apply `key.sub=value` overrides and validate it."""
    return parse_stage(read_yaml(path), overrides, source=str(path))
