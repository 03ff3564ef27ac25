"""Run a study: its stages in dependency order, each cached by its hash and resumable.

Every stage runs in DIR/stages/NAME, marked with its hash (its resolved config plus its
dependencies' hashes). A finished stage with the same hash is skipped; a killed one resumes in
place; a changed one is moved aside to NAME.stale-<hash> (nothing is deleted) and re-run, and so
are its dependants; a failed stage blocks its dependants and nothing else. DIR/study.json
records each stage's state, start and end time, notes and headline metrics.

Several processes may work on one study folder at once (two `study run`s, the local slots, SLURM
jobs): study.json is only changed under DIR/.study.lock (read, change one stage's record, write
atomically), and a stage runs only while its process holds DIR/stages/NAME.lock, so no stage ever
runs twice at the same time. Executors (training/executors.py) decide where `run_one` runs.
"""

from __future__ import annotations

import json
import os
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from chextrain.fileio import atomic_write_text
from chextrain.training.stage import REF_PREFIX, Stage, StageError
from chextrain.training.study import Study, study_hashes

STATE_FILE, LOCK_FILE = "study.json", ".study.lock"
TrainFn = Callable[..., Any]
Log = Callable[[str], None]


def stage_dir(out_dir: Path, name: str) -> Path:
    return Path(out_dir) / "stages" / name


def stage_lock(out_dir: Path, name: str) -> FileLock:
    """The lock a process holds while it runs stage NAME (beside the folder, which may be renamed)."""
    return FileLock(str(Path(out_dir) / "stages" / f"{name}.lock"))


def read_state(out_dir: Path) -> dict[str, Any]:
    path = Path(out_dir) / STATE_FILE
    return json.loads(path.read_text()) if path.exists() else {}


class StudyState:
    """study.json of a study folder, changed one stage record at a time under the study lock.

    Records of stages with an unchanged hash keep their state, times and metrics; a stage left
    `running` by a process that is gone (its stage lock is free) becomes `pending` again.
    """

    def __init__(self, study: Study, out_dir: Path) -> None:
        self.study, self.out_dir = study, Path(out_dir)
        self.lock = FileLock(str(self.out_dir / LOCK_FILE))

    @classmethod
    def start(cls, study: Study, data_root: Path, out_dir: Path) -> StudyState:
        """Create or refresh study.json for this version of the study (kept records merged in)."""
        self = cls(study, out_dir)
        (self.out_dir / "stages").mkdir(parents=True, exist_ok=True)
        hashes = study_hashes(study)
        with self.lock:
            previous = {s["name"]: s for s in read_state(self.out_dir).get("stages", [])}
            records = [self._record(name, hashes[name], previous.get(name, {})) for name in study.order]
            self._write(
                {
                    "name": study.name,
                    "source": study.source,
                    "profile": study.profile,
                    "data_root": str(data_root),
                    "pool_film": study.pool_film,  # the report's comparison of film photos
                    "notes": [],
                    "stages": records,
                }
            )
        return self

    def _record(self, name: str, digest: str, old: dict[str, Any]) -> dict[str, Any]:
        stage = self.study.stages[name]
        same = old.get("hash") == digest
        record = {
            "name": name,
            "label": stage.title,
            "kind": stage.objective,
            "hash": digest,
            "dir": str(stage_dir(self.out_dir, name)),
            "deps": self.study.deps[name],
            "budget": stage.data.budget.model_dump() if stage.data.budget else None,
            "state": old.get("state", "pending") if same else "pending",
            "reason": old.get("reason", "") if same else "",
            "seconds": old.get("seconds") if same else None,
            "notes": old.get("notes", []) if same else [],
            "metrics": old.get("metrics", {}) if same else {},
        }
        for key in ("started", "finished", "job_id", "executor"):
            if same and key in old:
                record[key] = old[key]
        if record["state"] == "running" and not _held(stage_lock(self.out_dir, name)):
            record["state"] = "pending"  # killed mid-stage: it resumes
        return record

    def _write(self, state: dict[str, Any]) -> None:
        atomic_write_text(self.out_dir / STATE_FILE, json.dumps(state, indent=2, default=str))

    def read(self) -> dict[str, Any]:
        """The current study.json (as other processes left it)."""
        with self.lock:
            return read_state(self.out_dir)

    def records(self) -> dict[str, dict[str, Any]]:
        """Each stage's current record, by name."""
        return {r["name"]: r for r in self.read()["stages"]}

    def update(self, name: str, **fields: Any) -> dict[str, Any]:
        """Change stage NAME's record (and nothing else) in study.json; returns the new record."""
        with self.lock:
            state = read_state(self.out_dir)
            record = next(r for r in state["stages"] if r["name"] == name)
            record.update(fields)
            self._write(state)
            return record

    def set_notes(self, notes: list[str]) -> dict[str, Any]:
        """Write the study-level notes; returns the whole state."""
        with self.lock:
            state = read_state(self.out_dir)
            state["notes"] = notes
            self._write(state)
            return state


def _held(lock: FileLock) -> bool:
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return True
    lock.release()
    return False


def wanted_stages(study: Study, only: Sequence[str] | None) -> list[str]:
    """The stages to run, in dependency order: `only` and whatever they need, or all."""
    if not only:
        return list(study.order)
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
    return [n for n in study.order if n in out]


def blocked_reason(study: Study, name: str, records: Mapping[str, Mapping[str, Any]]) -> str | None:
    """Why stage NAME cannot start now because a dependency failed or is blocked (None if none did)."""
    bad = [d for d in study.deps[name] if records[d]["state"] in ("failed", "blocked")]
    return f"needs {', '.join(bad)} ({records[bad[0]]['state']})" if bad else None


def run_one(
    study: Study,
    name: str,
    data_root: Path,
    out_dir: Path,
    *,
    train: TrainFn | None = None,
    progress: bool = True,
    log: Log = print,
    wait: bool = True,
) -> str:
    """Run stage NAME of the study here (this process), under its lock; returns its final state.

    The dependencies must be done. Another process running the same stage is waited for (its
    outcome counts) when `wait`, else reported as "busy". Used by every executor.
    """
    if train is None:
        from chextrain.training.lifecycle import train_stage as train
    state = StudyState(study, out_dir)  # study.json exists: StudyState.start ran in the caller
    folder = stage_dir(out_dir, name)
    lock = stage_lock(out_dir, name)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if not wait:
            return "busy"
        log(f"{name}: another process is running it ({lock.lock_file}); waiting for it")
        lock.acquire()
    try:
        record = state.records()[name]
        if record["state"] == "done" and (folder / "done.json").exists():
            return "done"
        _retire_stale(folder, record["hash"])
        stage, notes = _apply_fallbacks(study.stages[name], study.fallbacks)
        state.update(name, state="running", reason="", notes=notes, started=time.time(), pid=os.getpid())
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
            reason = f"{type(exc).__name__}: {exc}"
            atomic_write_text(folder / "error.txt", traceback.format_exc())
            state.update(name, state="failed", reason=reason, seconds=time.time() - t0, finished=time.time())
            log(f"{name}: FAILED: {reason} (traceback in {folder / 'error.txt'})")
            return "failed"
        if getattr(result, "rank", 0) != 0:  # a DDP worker: rank 0 records the outcome
            return "done"
        state.update(
            name,
            state="done",
            seconds=time.time() - t0,
            finished=time.time(),
            metrics=_headline(getattr(result, "metrics", {})),
        )
        log(f"{name}: done in {time.time() - t0:.0f} s")
        return "done"
    finally:
        lock.release()


def run_study(
    study: Study,
    data_root: Path,
    out_dir: Path,
    *,
    only: Sequence[str] | None = None,
    train: TrainFn | None = None,
    progress: bool = True,
    log: Log = print,
) -> dict[str, Any]:
    """Run the study's stages one after another in this process; returns the study state (study.json).

    Args:
        only: run just these stages (and whatever they need that is not done yet).
        train: the stage trainer, default chextrain.training.lifecycle.train_stage (tests inject one).
    """
    todo = wanted_stages(study, only)
    state = StudyState.start(study, data_root, out_dir)
    started = time.time()
    for i, name in enumerate(todo, 1):
        records = state.records()
        if records[name]["state"] == "done" and (stage_dir(out_dir, name) / "done.json").exists():
            log(f"[{i}/{len(todo)}] {name}: done (cached)")
            continue
        waiting = [d for d in study.deps[name] if records[d]["state"] != "done"]
        if waiting:
            reason = f"needs {', '.join(waiting)} ({records[waiting[0]]['state']})"
            state.update(name, state="blocked", reason=reason, metrics={})
            log(f"[{i}/{len(todo)}] {name}: blocked: {reason}")
            continue
        log(
            f"[{i}/{len(todo)}] {name} ({study.stages[name].title}) started; study time so far "
            f"{(time.time() - started) / 60:.1f} min"
        )
        run_one(
            study,
            name,
            data_root,
            out_dir,
            train=train,
            progress=progress,
            log=lambda line, i=i: log(f"[{i}/{len(todo)}] {line}"),
        )
    return finish_notes(study, state)


def finish_notes(study: Study, state: StudyState) -> dict[str, Any]:
    """Write the study's notes (profile notes + every stage's notes) and return the state."""
    records = state.records().values()
    return state.set_notes(study.notes + sorted({n for r in records for n in r.get("notes", [])}))


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
    """Profile fallbacks, e.g. {imagenet: random, xrv: random} when those weights are not on disk."""
    from chextrain.models.pretrained import init_fallback

    init, notes = init_fallback(stage.init, stage.backbone, fallbacks)
    return (stage.model_copy(update={"init": init}) if init != stage.init else stage), notes


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


STOPPED_REASON = "its process is gone (killed or interrupted); `study run` resumes it from its checkpoint"


def study_status(out_dir: Path) -> list[dict[str, Any]]:
    """The stages of a study folder with state, seconds, reason and headline metrics.

    A stage that study.json says is `running` on this machine but whose process is gone (its stage
    lock is free: Ctrl-C, kill -9, a reboot) shows as `stopped`; the next `study run` resumes it.
    SLURM jobs are left to what the scheduler says (executors.scheduler_status).
    """
    state = read_state(out_dir)
    if not state:
        raise FileNotFoundError(f"{out_dir}: no study.json (not a study output folder?)")
    stages = [dict(record) for record in state["stages"]]
    gone = [r["name"] for r in stages if r["state"] == "running" and r.get("executor") != "slurm"]
    gone = [name for name in gone if _free(stage_lock(out_dir, name))]
    if gone:  # read again: a stage that ended meanwhile freed its lock after writing its record
        now = {r["name"]: r["state"] for r in read_state(out_dir)["stages"]}
        for record in stages:
            if record["name"] in gone and now.get(record["name"]) == "running":
                record["state"], record["reason"] = "stopped", STOPPED_REASON
    return stages


def _free(lock: FileLock) -> bool:
    """Whether nobody holds `lock` (False where it cannot be tried: a read-only folder)."""
    try:
        return not _held(lock)
    except OSError:
        return False
