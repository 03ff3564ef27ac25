"""A study: a DAG of stages read from YAML, run in dependency order, each cached and resumable.

Study file keys: `name`, `defaults` (stage keys applied to every stage), `stages` (a list of
stage specs; `init: stage:NAME` makes the DAG), `variables` (named values substituted as
`${name}` in stage strings; `--set name=value` replaces one) and `profiles`
(`{demo: {defaults: {...}, stages: {NAME: {...}}, only: [NAME, ...], fallbacks: {imagenet: random}}}`)
that scale a study down (`only` keeps a reduced set of stages). Every stage runs in
DIR/stages/NAME; DIR/study.json records the state of each.

A finished stage is skipped on a re-run; an interrupted one resumes from its checkpoint; a stage
whose resolved config changed (its hash, which includes its dependencies' hashes) is re-run from
scratch (the old folder is kept beside it) and so are its dependants. A failed stage blocks its
dependants and nothing else.
"""

from __future__ import annotations

import graphlib
import json
import os
import re
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from chextrain.training.stage import REF_PREFIX, Stage, StageError, config_hash, parse_stage, resolved_config

STUDY_KEYS = ("name", "description", "defaults", "stages", "variables", "profiles")
PROFILE_KEYS = ("defaults", "stages", "fallbacks", "only", "description")
STATES = ("done", "running", "pending", "failed", "blocked")
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass
class Study:
    """A validated study: its stages in dependency order."""

    name: str
    source: str
    profile: str | None
    stages: dict[str, Stage]
    deps: dict[str, list[str]]
    order: list[str]
    fallbacks: dict[str, str] = field(default_factory=dict)


def deep_merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of `base` with `extra` merged in, mappings merged recursively."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _substitute(value: Any, variables: Mapping[str, Any], where: str) -> Any:
    """Replace ${name} in strings (recursively); a whole-string reference keeps the value's type."""
    if isinstance(value, str):
        whole = _VAR.fullmatch(value)
        if whole:
            if whole.group(1) not in variables:
                raise StageError(
                    f"{where}: unknown variable ${{{whole.group(1)}}}; defined: {sorted(variables)}"
                )
            return variables[whole.group(1)]

        def one(m: re.Match) -> str:
            if m.group(1) not in variables:
                raise StageError(f"{where}: unknown variable ${{{m.group(1)}}}; defined: {sorted(variables)}")
            return str(variables[m.group(1)])

        return _VAR.sub(one, value)
    if isinstance(value, Mapping):
        return {k: _substitute(v, variables, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, variables, f"{where}[{i}]") for i, v in enumerate(value)]
    return value


def stage_deps(stage: Stage) -> list[str]:
    """Stages this one needs: any `stage:NAME` string among its settings."""
    found: list[str] = []

    def walk(value: Any) -> None:
        if isinstance(value, str) and value.startswith(REF_PREFIX):
            found.append(value[len(REF_PREFIX) :])
        elif isinstance(value, Mapping):
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)

    walk(resolved_config(stage))
    return list(dict.fromkeys(found))


def parse_study(
    data: Any, *, source: str = "study", profile: str | None = None, overrides: Sequence[str] = ()
) -> Study:
    """Validate a study mapping; StageError lists the problems (stage by stage)."""
    if not isinstance(data, Mapping):
        raise StageError(f"{source}: expected a mapping with keys {list(STUDY_KEYS)}")
    unknown = sorted(set(data) - set(STUDY_KEYS))
    if unknown:
        raise StageError(f"{source}: unknown key(s) {unknown}; allowed: {list(STUDY_KEYS)}")
    if not isinstance(data.get("stages"), list) or not data["stages"]:
        raise StageError(f"{source}: `stages` must be a non-empty list of stage mappings")
    profiles = data.get("profiles") or {}
    chosen: Mapping[str, Any] = {}
    if profile is not None:
        if profile not in profiles:
            raise StageError(f"{source}: unknown profile {profile!r}; defined: {sorted(profiles)}")
        chosen = profiles[profile] or {}
        bad = sorted(set(chosen) - set(PROFILE_KEYS))
        if bad:
            raise StageError(
                f"{source}: profile {profile!r} has unknown key(s) {bad}; allowed: {list(PROFILE_KEYS)}"
            )
    variables = dict(data.get("variables") or {})
    stage_overrides = []
    for item in overrides:
        key, sep, text = item.partition("=")
        if sep and key.strip() in variables:
            variables[key.strip()] = yaml.safe_load(text)
        else:
            stage_overrides.append(item)
    defaults = deep_merge(data.get("defaults") or {}, chosen.get("defaults") or {})
    per_stage = chosen.get("stages") or {}
    names = [s.get("name") for s in data["stages"] if isinstance(s, Mapping)]
    missing = sorted(set(per_stage) - set(names))
    if missing:
        raise StageError(f"{source}: profile {profile!r} names unknown stage(s) {missing}")
    keep = set(chosen.get("only") or names)
    if keep - set(names):
        raise StageError(
            f"{source}: profile {profile!r} `only` names unknown stage(s) {sorted(keep - set(names))}"
        )
    stages: dict[str, Stage] = {}
    problems: list[str] = []
    for i, spec in enumerate(data["stages"]):
        if isinstance(spec, Mapping) and spec.get("name") not in keep:
            continue
        where = f"{source}: stages[{i}]" + (f" ({spec.get('name')})" if isinstance(spec, Mapping) else "")
        if not isinstance(spec, Mapping):
            problems.append(f"{where}: expected a mapping")
            continue
        merged = deep_merge(deep_merge(defaults, spec), per_stage.get(spec.get("name"), {}) or {})
        try:
            stage = parse_stage(_substitute(merged, variables, where), stage_overrides, source=where)
        except StageError as err:
            problems.append(str(err))
            continue
        if stage.name in stages:
            problems.append(f"{where}: duplicate stage name {stage.name!r}")
        stages[stage.name] = stage
    if problems:
        raise StageError("\n".join(problems))
    deps = {name: stage_deps(stage) for name, stage in stages.items()}
    for name, needs in deps.items():
        for dep in needs:
            if dep not in stages:
                raise StageError(f"{source}: stage {name!r} refers to unknown stage {dep!r}")
    try:
        order = list(graphlib.TopologicalSorter({n: deps[n] for n in stages}).static_order())
    except graphlib.CycleError as err:
        raise StageError(f"{source}: stages form a cycle: {' -> '.join(err.args[1])}") from None
    return Study(
        name=str(data.get("name", Path(source).stem)),
        source=source,
        profile=profile,
        stages=stages,
        deps=deps,
        order=order,
        fallbacks=dict(chosen.get("fallbacks") or {}),
    )


def load_study(path: str | Path, *, profile: str | None = None, overrides: Sequence[str] = ()) -> Study:
    """Read and validate a study YAML file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as err:
        raise StageError(f"cannot read study file {path}: {err.strerror}") from err
    except yaml.YAMLError as err:
        raise StageError(f"{path}: not valid YAML: {err}") from err
    return parse_study(data, source=str(path), profile=profile, overrides=overrides)


def study_hashes(study: Study) -> dict[str, str]:
    """Each stage's hash, including its dependencies' hashes (so a change upstream propagates)."""
    hashes: dict[str, str] = {}
    for name in study.order:
        hashes[name] = config_hash(study.stages[name], {d: hashes[d] for d in study.deps[name]})
    return hashes


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
    state["notes"] = sorted({n for r in records.values() for n in r.get("notes", [])})
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
