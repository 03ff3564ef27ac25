"""A training stage as data: the pydantic spec validated from YAML, overrides, and its config hash.

A strategy of the paper differs from another only in where its weights come from, what data
trains it, what is frozen and which head learns; a `Stage` says exactly that. Defaults are the
paper's hyperparameters (DenseNet-121 from ImageNet, U-Ones, Adam 1e-4, batch 16, 3 epochs, 320 px).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from chextrain.data.transforms import Preprocessing
from chextrain.labels import resolve_policy
from chextrain.models.net import BACKBONES
from chextrain.training.specs import (
    AugmentSpec,
    DataSpec,
    MocoSpec,
    OptimizerSpec,
    Spec,
    SplitSpec,
)

DATASETS: tuple[str, ...] = ("chexpert", "chexphoto", "other")
KINDS: tuple[str, ...] = ("digital", "natural", "synthetic-digital", "synthetic-photographic", "film")
DOMAINS: tuple[str, ...] = ("digital", "photo")
PRECISIONS: tuple[str, ...] = ("auto", "32-true", "16-mixed", "bf16-mixed", "64-true")
_PRECISION_ALIASES: dict[str, str] = {"32": "32-true", "16": "16-mixed", "bf16": "bf16-mixed",
                                      "64": "64-true"}
REF_PREFIX = "stage:"
# Keys that change neither the weights nor the outputs: left out of the config hash.
HASH_EXCLUDE: tuple[str, ...] = ("label", "num_workers")


HeadName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z][A-Za-z0-9_]*$")]


class StageError(ValueError):
    """A stage file or override is invalid; the message lists every bad field."""


class Stage(Spec):
    """One training stage. Field names are the YAML keys."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    label: str | None = None  # strategy name printed in tables; defaults to name
    objective: Literal["supervised", "moco"] = "supervised"
    init: str = "imagenet"  # imagenet | random | FILE | run folder | stage:NAME
    backbone: str = "densenet121"
    data: DataSpec = DataSpec()
    policy: str | dict[str, str] = "ones"
    split: SplitSpec = SplitSpec()
    heads: list[HeadName] = Field(default=["shared"], min_length=1)
    domain_heads: dict[Literal["digital", "photo"], str] = {"digital": "shared", "photo": "shared"}
    train_heads: list[HeadName] = Field(default=["shared"], min_length=1)
    router: bool = False
    freeze: Literal["none", "encoder", "last-block"] = "none"
    optimizer: OptimizerSpec = OptimizerSpec()
    epochs: int | None = Field(default=3, gt=0)
    max_steps: int | None = Field(default=None, gt=0)
    batch_size: int = Field(default=16, gt=0)
    image_size: int = Field(default=320, ge=16)
    augment: AugmentSpec = AugmentSpec()
    preprocess: Preprocessing = Preprocessing()
    precision: str = "auto"
    devices: int | Literal["auto"] = "auto"
    num_nodes: int = Field(default=1, gt=0)
    seed: int = 0
    val_every_n_steps: int | None = Field(default=None, gt=0)  # None: once per epoch
    checkpoint_every_n_steps: int = Field(default=1000, gt=0)
    monitor: str = "val/auc_mean"
    monitor_mode: Literal["max", "min"] = "max"
    select: Literal["last", "best"] = "last"  # which weights go into the bundle
    num_workers: int | Literal["auto"] = "auto"
    evaluate: list[Literal["val", "test"]] = ["val", "test"]
    moco: MocoSpec = MocoSpec()  # used by `objective: moco` only

    @field_validator("policy")
    @classmethod
    def _known_policy(cls, value: str | dict[str, str]) -> str | dict[str, str]:
        resolve_policy(value)  # raises ValueError naming the bad entry
        return value

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, value: str) -> str:
        if value not in BACKBONES:
            raise ValueError(f"{value!r} is not one of {sorted(BACKBONES)}")
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

    @field_validator("preprocess", mode="before")
    @classmethod
    def _preprocess_name(cls, value: Any) -> Any:
        # `preprocess: imagenet` (or histeq): a bare name. Set or not, see runner.apply_expected_input.
        return {"name": value} if isinstance(value, str) else value

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

    @field_validator("heads", "train_heads")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"{value}: names must be unique")
        return value

    @model_validator(mode="before")
    @classmethod
    def _steps_replace_epochs(cls, data: Any) -> Any:
        # `max_steps` alone means "train for that many steps", not "3 epochs or that many steps".
        if isinstance(data, Mapping) and data.get("max_steps") is not None and "epochs" not in data:
            return {**data, "epochs": None}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> Stage:
        problems = []
        if self.devices == 0:
            problems.append("devices: must be >= 1 or 'auto'")
        if self.epochs is None and self.max_steps is None:
            problems.append("epochs / max_steps: give at least one")
        for domain, head in self.domain_heads.items():
            if head not in self.heads:
                problems.append(f"domain_heads.{domain}: {head!r} is not one of heads {self.heads}")
        allowed = [*self.heads, *(["router"] if self.router else [])]
        for head in self.train_heads:
            if head not in allowed:
                problems.append(f"train_heads: {head!r} is not one of {allowed}")
        if "router" in self.heads:
            problems.append("heads: 'router' is reserved for the domain router (set router: true)")
        if problems:
            raise ValueError("\n".join(problems))
        return self

    @property
    def title(self) -> str:
        """The strategy name for tables."""
        return self.label or self.name


def stage_refs(stage: Stage) -> list[str]:
    """Names of the stages this stage depends on (`init: stage:NAME`), for a study's DAG."""
    return [stage.init[len(REF_PREFIX) :]] if stage.init.startswith(REF_PREFIX) else []


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
    """Validate plain data (a YAML mapping) into a Stage, or raise StageError listing every problem."""
    if not isinstance(data, Mapping):
        raise StageError(f"{source}: expected a mapping of stage keys, got {type(data).__name__}")
    data = apply_overrides(data, overrides)
    try:
        return Stage.model_validate(data)
    except ValidationError as err:
        raise StageError(_format_errors(err, source, data)) from None


def read_yaml(path: str | Path, what: str = "stage") -> Any:
    """The plain data of a YAML file; StageError naming the file when it cannot be read or parsed."""
    path = Path(path)
    try:
        return yaml.safe_load(path.read_text())
    except OSError as err:
        raise StageError(f"cannot read {what} file {path}: {err.strerror}") from err
    except yaml.YAMLError as err:
        raise StageError(f"{path}: not valid YAML: {err}") from err


def load_stage(path: str | Path, overrides: Sequence[str] = ()) -> Stage:
    """Read a stage YAML file, apply `key.sub=value` overrides and validate it."""
    return parse_stage(read_yaml(path), overrides, source=str(path))


def _format_errors(err: ValidationError, source: str, data: Mapping[str, Any]) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            msg = f"unknown key; allowed keys: {', '.join(_allowed_keys(e['loc'][:-1]))}"
        elif e["type"] == "missing":
            msg = "required key is missing"
        elif not e["loc"] and e["type"] == "value_error":  # cross-field checks: one "field: problem" a line
            lines += [f"  {line}" for line in e["msg"].removeprefix("Value error, ").splitlines()]
            continue
        else:
            msg = e["msg"].removeprefix("Value error, ")
            if "input" in e and not isinstance(e["input"], Mapping):
                msg += f" (got {e['input']!r})"
        lines.append(f"  {loc}: {msg}")
    return f"{source}: {len(lines)} invalid field(s):\n" + "\n".join(lines)


def _allowed_keys(loc: Sequence[Any]) -> list[str]:
    model: Any = Stage
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        annotation = getattr(field, "annotation", None)
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if model is None:
            return []
    return list(model.model_fields)
