"""Reading a study folder for the report: study.json's stages, and what each stage's folder says
(model.json: the splits it reports, its input; predictions_val.parquet: its tuned thresholds).

Never trains or scores a model; a malformed file is a ReportError naming it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chextrain.evaluation import tables
from chextrain.evaluation.document import SPLITS
from chextrain.evaluation.metrics import MetricsError
from chextrain.evaluation.predict import tune_head_thresholds
from chextrain.evaluation.tables import ReportError


@dataclass(frozen=True)
class StageInfo:
    """One stage of study.json, with the strategy name the tables print."""

    name: str
    strategy: str
    state: str
    reason: str
    seconds: float | None
    kind: str
    budget: dict[str, int] | None
    notes: list[str]
    dir: Path


def read_study(study_dir: Path) -> tuple[dict[str, Any], list[StageInfo]]:
    """study.json and its stages; a stage folder that moved with DIR is found under DIR/stages/NAME."""
    path = Path(study_dir) / "study.json"
    if not path.is_file():
        raise ReportError(f"{study_dir}: no study.json (expected a folder written by `chextrain study run`)")
    try:
        study = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ReportError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(study, dict) or not isinstance(study.get("stages"), list):
        raise ReportError(f"{path}: expected an object with a 'stages' list")
    stages: list[StageInfo] = []
    for i, s in enumerate(study["stages"]):
        if not isinstance(s, dict) or not s.get("name") or not s.get("state"):
            raise ReportError(f"{path}: stage {i} lacks 'name' or 'state'")
        folder = Path(s["dir"]) if s.get("dir") else None
        if folder is None or not folder.is_dir():
            folder = Path(study_dir) / "stages" / s["name"]
        label = str(s.get("label") or s["name"])
        strategy = f"{label} ({s['name']})" if any(x.strategy == label for x in stages) else label
        budget = s.get("budget") if isinstance(s.get("budget"), dict) else None
        stages.append(
            StageInfo(
                name=s["name"],
                strategy=strategy,
                state=s["state"],
                reason=s.get("reason") or "",
                seconds=s.get("seconds"),
                kind=s.get("kind") or "supervised",
                budget=budget,
                notes=[str(n) for n in s.get("notes") or []],
                dir=folder,
            )
        )
    return study, stages


def tuned_thresholds(stage: StageInfo) -> dict[str, dict[str, float]] | None:
    """{head: {slug: t}} tuned (maximising MCC) on the stage's saved validation predictions.

    Recomputed from predictions_val.parquet, as the stage tuned them (predict.tune_head_thresholds),
    so the tuned-threshold rows need nothing but saved predictions; None without that file.
    """
    file = stage.dir / "predictions_val.parquet"
    if not file.is_file():
        return None
    try:
        return tune_head_thresholds(tables.read_predictions(file))
    except MetricsError as err:
        raise ReportError(f"{file}: {err}") from err


def reported_splits(stage: StageInfo) -> frozenset[str]:
    """The splits the stage reports: its `evaluate` (model.json config) of val / test; both when unsaid.

    Every stage saves validation predictions (they tune the thresholds), but a stage that evaluates
    test only (e.g. a fixed-budget stage) stays out of Table 1.
    """
    path = stage.dir / "model.json"
    try:
        config = json.loads(path.read_text()).get("config") if path.is_file() else None
    except (json.JSONDecodeError, AttributeError) as err:
        raise ReportError(f"{path}: expected a JSON object ({err})") from err
    evaluate = config.get("evaluate") if isinstance(config, dict) else None
    return frozenset(SPLITS if not isinstance(evaluate, list) else (str(e) for e in evaluate))


def stage_input(stage: StageInfo) -> str:
    """The input the stage's model was trained and scored at, from model.json: `224 px, histeq`,
    and which of the two its init weights brought (model.json training.input_from):
    `224 px, histeq (from the init weights)`, `32 px, histeq (preprocessing from the init weights)`."""
    path = stage.dir / "model.json"
    if not path.is_file():
        return ""
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ReportError(f"{path}: not valid JSON ({err})") from err
    size, prep = meta.get("image_size"), meta.get("preprocessing")
    name = prep.get("name") if isinstance(prep, dict) else None
    text = ", ".join(x for x in (f"{size} px" if size else "", str(name or "")) if x)
    training = meta.get("training")
    sources = training.get("input_from") if isinstance(training, dict) else None
    if not isinstance(sources, dict):
        return text
    brought = [
        what
        for key, what in (("image_size", "size"), ("preprocessing", "preprocessing"))
        if sources.get(key) == "init weights"
    ]  # lifecycle.INIT_WEIGHTS
    if len(brought) == 2:
        return f"{text} (from the init weights)"
    return f"{text} ({brought[0]} from the init weights)" if brought else text
