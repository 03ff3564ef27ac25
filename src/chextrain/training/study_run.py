"""Run a study: its stages in dependency order, each cached by its hash and resumable.

Every stage runs in DIR/stages/NAME, marked with its hash (its resolved config plus its
dependencies' hashes). A finished stage with the same hash is skipped; a killed one resumes in
place; a changed one is moved aside to NAME.stale-<hash> (nothing is deleted) and re-run, and so
are its dependants; a failed stage blocks its dependants and nothing else. DIR/study.json
records each stage's state, time, notes and headline metrics.
"""

from __future__ import annotations

import json
import os
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from chextrain.training.stage import REF_PREFIX, Stage, StageError
from chextrain.training.study import Study, study_hashes


def stage_dir(out_dir: Path, name: str) -> Path:
    return Path(out_dir) / "stages" / name


def read_state(out_dir: Path) -> dict[str, Any]:
    path = Path(out_dir) / "study.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


TrainFn = Callable[..., Any]


def blocker(stage: Stage) -> str | None:
    """Why a stage cannot run in this installation (None if it can)."""
    if stage.objective == "moco":
        try:
            import chextrain.training.moco  # noqa: F401
        except ImportError:
            return "needs moco (MoCo pre-training is not implemented in this version)"
    return None


def run_study(
    study: Study,
    data_root: Path,
    out_dir: Path,
    *,
    only: Sequence[str] | None = None,
    train: TrainFn | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the study's stages in dependency order; returns the study state (also in DIR/study.json).

    Args:
        only: run just these stages (and whatever they need that is not done yet).
        train: the stage trainer, default chextrain.training.runner.train_stage (tests inject one).
    """
    if train is None:
        from chextrain.training.runner import train_stage as train
    out_dir = Path(out_dir)
    (out_dir / "stages").mkdir(parents=True, exist_ok=True)
    hashes = study_hashes(study)
    wanted = _closure(study, only) if only else set(study.order)
    previous = {s["name"]: s for s in read_state(out_dir).get("stages", [])}
    state = {
        "name": study.name,
        "source": study.source,
        "profile": study.profile,
        "data_root": str(data_root),
        "notes": [],
        "stages": [],
    }
    records: dict[str, dict[str, Any]] = {}
    for name in study.order:
        stage = study.stages[name]
        old = previous.get(name, {})
        records[name] = {
            "name": name,
            "label": stage.title,
            "kind": stage.objective,
            "hash": hashes[name],
            "dir": str(stage_dir(out_dir, name)),
            "deps": study.deps[name],
            "budget": stage.data.budget.model_dump() if stage.data.budget else None,
            "state": old.get("state", "pending") if old.get("hash") == hashes[name] else "pending",
            "reason": old.get("reason", ""),
            "seconds": old.get("seconds"),
            "notes": old.get("notes", []),
            "metrics": old.get("metrics", {}),
        }
        if records[name]["state"] == "running":  # killed mid-stage: it resumes
            records[name]["state"] = "pending"
    state["stages"] = [records[n] for n in study.order]

    def save() -> None:
        _write_json(out_dir / "study.json", state)

    todo = [n for n in study.order if n in wanted]
    started = time.time()
    for i, name in enumerate(todo, 1):
        rec, stage = records[name], study.stages[name]
        folder = stage_dir(out_dir, name)
        if rec["state"] == "done" and (folder / "done.json").exists():
            log(f"[{i}/{len(todo)}] {name}: done (cached)")
            continue
        failed_deps = [d for d in study.deps[name] if records[d]["state"] != "done"]
        reason = blocker(stage) or (
            f"needs {', '.join(failed_deps)} ({records[failed_deps[0]]['state']})" if failed_deps else None
        )
        if reason:
            rec.update(state="blocked", reason=reason, metrics={})
            log(f"[{i}/{len(todo)}] {name}: blocked: {reason}")
            save()
            continue
        _retire_stale(folder, rec["hash"])
        stage, notes = _apply_fallbacks(stage, study.fallbacks)
        rec.update(state="running", reason="", notes=notes)
        save()
        elapsed = time.time() - started
        log(f"[{i}/{len(todo)}] {name} ({stage.title}) started; study time so far {elapsed / 60:.1f} min")
        for note in notes:
            log(f"    note: {note}")
        t0 = time.time()
        try:
            result = train(
                stage,
                Path(data_root),
                folder,
                resolve_ref=lambda ref: stage_dir(out_dir, ref.removeprefix(REF_PREFIX)),
                progress=progress,
            )
        except Exception as exc:  # a failed stage blocks its dependants only
            rec.update(state="failed", reason=f"{type(exc).__name__}: {exc}", seconds=time.time() - t0)
            (folder / "error.txt").write_text(traceback.format_exc())
            log(f"[{i}/{len(todo)}] {name}: FAILED: {rec['reason']} (traceback in {folder / 'error.txt'})")
            save()
            continue
        rec.update(state="done", seconds=time.time() - t0, metrics=_headline(getattr(result, "metrics", {})))
        log(f"[{i}/{len(todo)}] {name}: done in {rec['seconds']:.0f} s")
        save()
    state["notes"] = study.notes + sorted({n for r in records.values() for n in r.get("notes", [])})
    save()
    return state


def _closure(study: Study, only: Sequence[str]) -> set[str]:
    unknown = sorted(set(only) - set(study.stages))
    if unknown:
        raise StageError(f"--only names unknown stage(s) {unknown}; stages: {study.order}")
    out: set[str] = set()
    todo = list(only)
    while todo:
        name = todo.pop()
        if name not in out:
            out.add(name)
            todo.extend(study.deps[name])
    return out


def _retire_stale(folder: Path, current: str) -> None:
    """Move a stage folder made by another config aside (nothing is deleted); mark the folder."""
    marker = folder / "study_hash"
    if folder.exists():
        old = marker.read_text().strip() if marker.exists() else "unmarked"
        if old != current:
            target = folder.with_name(f"{folder.name}.stale-{old}")
            if target.exists():
                target = folder.with_name(f"{folder.name}.stale-{old}-{int(time.time())}")
            folder.rename(target)
    folder.mkdir(parents=True, exist_ok=True)
    marker.write_text(current)


def _apply_fallbacks(stage: Stage, fallbacks: Mapping[str, str]) -> tuple[Stage, list[str]]:
    """Profile fallbacks, e.g. {imagenet: random} when the ImageNet weights are not on disk."""
    notes: list[str] = []
    if stage.init == "imagenet" and "imagenet" in fallbacks:
        if not _imagenet_available(stage.backbone):
            replacement = fallbacks["imagenet"]
            stage = stage.model_copy(update={"init": replacement})
            notes.append(
                f"ImageNet weights for {stage.backbone} are not on this machine: init {replacement!r} used"
            )
    return stage, notes


def _imagenet_available(backbone: str) -> bool:
    from chextrain.models.weights import WeightsError, imagenet_checkpoint_path

    try:
        return imagenet_checkpoint_path(backbone)[0].is_file()
    except WeightsError:
        return False


def _headline(metrics: Any) -> dict[str, float]:
    """A few numbers for `study status`: average AUC/MCC per evaluated group when present."""
    out: dict[str, float] = {}
    if isinstance(metrics, Mapping):
        for key, value in metrics.items():
            if isinstance(value, (int, float)):
                out[key] = float(value)
            elif isinstance(value, Mapping) and isinstance(value.get("average"), Mapping):
                for m in ("auc", "mcc"):
                    if m in value["average"]:
                        out[f"{key}/{m}"] = float(value["average"][m])
    return out


def study_status(out_dir: Path) -> list[dict[str, Any]]:
    """The stages of a study folder with state, seconds, reason and headline metrics."""
    state = read_state(out_dir)
    if not state:
        raise FileNotFoundError(f"{out_dir}: no study.json (not a study output folder?)")
    return state["stages"]
