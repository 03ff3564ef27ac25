"""A study: a DAG of stages read from YAML (run by training/study_run.py).

Study file keys: `name`, `defaults` (stage keys applied to every stage whose objective has
them), `resources` (SLURM resources of every stage, see specs.ResourcesSpec), `stages` (a list
of stage specs; `init: stage:NAME` makes the DAG), `variables` (named values substituted as
`${name}` in stage strings; `--set name=value` replaces one) and `profiles`
(`{demo: {defaults: {...}, stages: {NAME: {...}}, only: [NAME, ...], fallbacks: {imagenet: random}}}`)
that scale a study down (`only` keeps a reduced set of stages), and `report` (how the report
compares: `{pool_film: true}` counts CheXphoto v1.1's film photos in Photos; by default they are a
comparison of their own, Film).
"""

from __future__ import annotations

import graphlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from chextrain.training.stage import (
    REF_PREFIX,
    STAGE_TYPES,
    Stage,
    StageError,
    config_hash,
    parse_stage,
    read_yaml,
    resolved_config,
)

STUDY_KEYS = ("name", "description", "defaults", "resources", "stages", "variables", "profiles", "report")
REPORT_KEYS = ("pool_film",)
PROFILE_KEYS = ("defaults", "stages", "fallbacks", "only", "description")
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
    notes: list[str] = field(default_factory=list)  # shown at the top of the report
    pool_film: bool = False  # the report counts film photos in Photos (default: Film apart)


def deep_merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of `base` with `extra` merged in, mappings merged recursively."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def applicable_defaults(defaults: Mapping[str, Any], objective: Any) -> dict[str, Any]:
    """The study defaults that apply to a stage of this objective (e.g. `evaluate` not to MoCo).

    A stage's own keys are checked strictly; study-wide defaults reach only the stages whose
    objective has the key. An unknown objective keeps every default (its stage is refused anyway).
    """
    fields = STAGE_TYPES[objective].model_fields if objective in STAGE_TYPES else None
    return {k: v for k, v in defaults.items() if fields is None or k in fields or k not in _ANY_STAGE_KEYS}


_ANY_STAGE_KEYS = frozenset(k for t in STAGE_TYPES.values() for k in t.model_fields)


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
    if data.get("resources"):  # the study's SLURM resources: every stage's, unless it sets its own
        defaults = deep_merge({"resources": data["resources"]}, defaults)
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
        own = deep_merge(spec, per_stage.get(spec.get("name"), {}) or {})
        merged = deep_merge(applicable_defaults(defaults, own.get("objective", "supervised")), own)
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
        pool_film=report_options(data.get("report"), source)["pool_film"],
        name=str(data.get("name", Path(source).stem)),
        source=source,
        profile=profile,
        stages=stages,
        deps=deps,
        order=order,
        fallbacks=dict(chosen.get("fallbacks") or {}),
        notes=[
            f"profile {profile!r} runs a reduced set of {len(keep)} of the study's {len(names)} stages: "
            + ", ".join(n for n in names if n in keep)
        ]
        if len(keep) < len(names)
        else [],
    )


def report_options(report: Any, source: str) -> dict[str, bool]:
    """The study's `report:` mapping checked: {pool_film: bool} (False when absent)."""
    if report is None:
        return {"pool_film": False}
    if not isinstance(report, Mapping):
        raise StageError(
            f"{source}: report: expected a mapping with keys {list(REPORT_KEYS)}, got {report!r}"
        )
    unknown = sorted(set(report) - set(REPORT_KEYS))
    if unknown:
        raise StageError(f"{source}: report: unknown key(s) {unknown}; allowed: {list(REPORT_KEYS)}")
    pool = report.get("pool_film", False)
    if not isinstance(pool, bool):
        raise StageError(f"{source}: report.pool_film: expected true or false, got {pool!r}")
    return {"pool_film": pool}


def load_study(path: str | Path, *, profile: str | None = None, overrides: Sequence[str] = ()) -> Study:
    """Read and validate a study YAML file."""
    return parse_study(read_yaml(path, "study"), source=str(path), profile=profile, overrides=overrides)


def study_hashes(study: Study) -> dict[str, str]:
    """Each stage's hash, including its dependencies' hashes (so a change upstream propagates)."""
    hashes: dict[str, str] = {}
    for name in study.order:
        hashes[name] = config_hash(study.stages[name], {d: hashes[d] for d in study.deps[name]})
    return hashes
