"""Study runner: DAG order, caching, invalidation, blocked and failed stages (fake trainer)."""

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import yaml

from chextrain.training.stage import StageError
from chextrain.training.study import load_study, parse_study
from chextrain.training.study_run import run_study, study_status

STUDY = {
    "name": "toy",
    "defaults": {"backbone": "tiny", "init": "random", "image_size": 32, "max_steps": 2},
    "stages": [
        {"name": "c", "init": "stage:b", "data": {"train": ["chexphoto"]}},
        {"name": "a", "data": {"train": ["chexpert"]}},
        {"name": "b", "init": "stage:a"},
        {"name": "solo", "label": "Independent"},
        {"name": "pre", "objective": "moco"},
        {"name": "after_pre", "init": "stage:pre"},
    ],
    "profiles": {"small": {"defaults": {"batch_size": 4}, "stages": {"a": {"epochs": 1}}}},
}


@dataclass
class Result:
    metrics: dict


class FakeTrain:
    """Records calls and writes done.json like the real runner; can be told to fail a stage."""

    def __init__(self, fail: set[str] = frozenset()):
        self.calls: list[str] = []
        self.fail = set(fail)

    def __call__(self, stage, data_root, out_dir, *, resolve_ref, progress):
        self.calls.append(stage.name)
        if stage.init.startswith("stage:"):
            assert (resolve_ref(stage.init) / "done.json").exists()  # its dependency finished first
        if stage.name in self.fail:
            raise RuntimeError(f"boom in {stage.name}")
        (out_dir / "done.json").write_text(json.dumps({"stage": stage.name}))
        return Result(metrics={"test": {"average": {"auc": 0.5, "mcc": 0.1}}})


def run(study, tmp_path, train, **kw):
    return run_study(
        study, tmp_path / "data", tmp_path / "out", train=train, progress=False, log=lambda s: None, **kw
    )


def states(state):
    return {s["name"]: s["state"] for s in state["stages"]}


def test_order_respects_dependencies():
    study = parse_study(STUDY)
    order = study.order
    assert order.index("a") < order.index("b") < order.index("c")
    assert study.deps == {"c": ["b"], "a": [], "b": ["a"], "solo": [], "pre": [], "after_pre": ["pre"]}


def test_runs_caches_and_blocks(tmp_path):
    study = parse_study(STUDY)
    train = FakeTrain(fail={"pre"})
    state = run(study, tmp_path, train)
    assert sorted(train.calls) == ["a", "b", "c", "pre", "solo"]
    assert states(state) == {
        "a": "done",
        "b": "done",
        "c": "done",
        "solo": "done",
        "pre": "failed",
        "after_pre": "blocked",
    }
    reasons = {s["name"]: s["reason"] for s in state["stages"]}
    assert reasons["pre"] == "RuntimeError: boom in pre"
    assert reasons["after_pre"] == "needs pre (failed)"
    assert {s["name"]: s for s in study_status(tmp_path / "out")}["a"]["metrics"] == {
        "test/auc": 0.5,
        "test/mcc": 0.1,
    }
    again = FakeTrain(fail={"pre"})
    run(study, tmp_path, again)
    assert again.calls == ["pre"]  # everything else cached; the failed stage is tried again
    with_moco = FakeTrain()
    state = run(study, tmp_path, with_moco)
    assert with_moco.calls == ["pre", "after_pre"] and states(state)["after_pre"] == "done"


def test_changed_config_reruns_stage_and_dependants_keeping_old_output(tmp_path):
    run(parse_study(STUDY), tmp_path, FakeTrain())
    changed = yaml.safe_load(yaml.safe_dump(STUDY))
    changed["stages"][2]["optimizer"] = {"lr": 1.0e-5}  # stage b
    train = FakeTrain()
    run(parse_study(changed), tmp_path, train)
    assert sorted(train.calls) == ["b", "c"]
    stale = sorted(p.name for p in (tmp_path / "out" / "stages").iterdir() if ".stale-" in p.name)
    assert len(stale) == 2 and stale[0].startswith("b.stale-") and stale[1].startswith("c.stale-")


def test_failure_blocks_dependants_only(tmp_path):
    train = FakeTrain(fail={"a"})
    state = run(parse_study(STUDY), tmp_path, train)
    assert (
        states(state)["a"] == "failed" and states(state)["b"] == "blocked" and states(state)["c"] == "blocked"
    )
    assert states(state)["solo"] == "done"
    assert "boom in a" in (tmp_path / "out" / "stages" / "a" / "error.txt").read_text()
    retry = FakeTrain()
    state = run(parse_study(STUDY), tmp_path, retry)
    assert sorted(retry.calls) == ["a", "b", "c"] and states(state)["c"] == "done"


def test_interrupted_stage_is_resumed_in_place(tmp_path):
    study = parse_study(STUDY)
    run(study, tmp_path, FakeTrain(), only=["a"])
    out = tmp_path / "out"
    data = json.loads((out / "study.json").read_text())
    for s in data["stages"]:  # as if the runner was killed while b was running
        if s["name"] == "b":
            s["state"] = "running"
    (out / "study.json").write_text(json.dumps(data))
    (out / "stages" / "b").mkdir(parents=True)
    (out / "stages" / "b" / "study_hash").write_text(
        [s for s in data["stages"] if s["name"] == "b"][0]["hash"]
    )
    (out / "stages" / "b" / "checkpoint.partial").write_text("x")
    train = FakeTrain()
    run(study, tmp_path, train, only=["b"])
    assert train.calls == ["b"]
    assert (out / "stages" / "b" / "checkpoint.partial").exists()  # same folder: the runner resumes it


def test_only_runs_what_is_needed(tmp_path):
    train = FakeTrain()
    run(parse_study(STUDY), tmp_path, train, only=["b"])
    assert train.calls == ["a", "b"]
    with pytest.raises(StageError, match="unknown stage"):
        run(parse_study(STUDY), tmp_path, train, only=["zzz"])


def test_profiles_and_variables():
    data = dict(STUDY, variables={"start": "stage:a"})
    data["stages"] = [STUDY["stages"][1], {"name": "v", "init": "${start}"}]
    study = parse_study(data, profile="small")
    assert study.stages["a"].batch_size == 4 and study.stages["a"].epochs == 1
    assert study.deps["v"] == ["a"]
    swapped = parse_study(data, overrides=["start=/weights/moco.pt"])
    assert swapped.stages["v"].init == "/weights/moco.pt" and swapped.deps["v"] == []
    with pytest.raises(StageError, match="unknown profile 'big'"):
        parse_study(data, profile="big")


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d["stages"].append({"name": "x", "init": "stage:nope"}), "unknown stage 'nope'"),
        (lambda d: d["stages"].append({"name": "a"}), "duplicate stage name 'a'"),
        (lambda d: d.update(colour="red"), r"unknown key\(s\) \['colour'\]"),
        (lambda d: d["stages"][1].update(freeze="half", batch_size=0), "freeze"),
        (lambda d: d["stages"][1].update(init="stage:c"), "cycle"),
    ],
)
def test_bad_studies(mutate, message):
    data = yaml.safe_load(yaml.safe_dump(STUDY))
    mutate(data)
    with pytest.raises(StageError, match=message):
        parse_study(data)


def test_shipped_studies_parse():
    root = Path(__file__).resolve().parents[1] / "configs" / "studies"
    full = load_study(root / "chextraining.yaml")
    assert full.stages["baseline_ft_chexphoto"].optimizer.lr == 1.0e-5
    assert full.stages["mixed_chexpert_head"].freeze == "encoder"
    assert full.stages["baseline"].image_size == 320 and full.stages["baseline"].epochs == 3
    demo = load_study(root / "chextraining.yaml", profile="demo")
    assert demo.stages["baseline"].image_size == 64
    assert demo.fallbacks == {"imagenet": "random", "xrv": "random"}
    # "Mixed + Rectified Photos": mixed training with photos flattened, the rest as `mixed`
    rectified, mixed = demo.stages["mixed_rectified"], demo.stages["mixed"]
    assert rectified.label == "Mixed + Rectified Photos" and rectified.preprocessing.rectify is not None
    assert rectified.data == mixed.data and rectified.epochs == mixed.epochs
    assert (
        rectified.model_copy(
            update={"preprocessing": mixed.preprocessing, "name": "mixed", "label": mixed.label}
        )
        == mixed
    )
    budget = load_study(root / "fixed_budget.yaml")
    assert [s.data.budget.digital for s in budget.stages.values()] == list(range(0, 10001, 1000))
    reduced = load_study(root / "fixed_budget.yaml", profile="demo")
    assert len(reduced.stages) == 3 and "reduced set of 3 of the study's 11 stages" in reduced.notes[0]
    assert full.notes == [] and len(demo.notes) == 1  # the demo leaves mixed_xrv out, and says so
    assert "reduced set of 14 of the study's 15 stages" in demo.notes[0] and "mixed_xrv" not in demo.notes[0]


def test_film_pooling_is_a_study_option_that_reaches_the_report(tmp_path):
    """`report: {pool_film: true}` pools film photos into Photos; by default Film is its own comparison."""
    from chextrain.evaluation.report import write_report
    from tests.test_report import make_study

    assert parse_study(STUDY).pool_film is False
    pooled = parse_study({**STUDY, "report": {"pool_film": True}})
    assert pooled.pool_film is True
    state = run(pooled, tmp_path, FakeTrain())
    assert json.loads((tmp_path / "out" / "study.json").read_text())["pool_film"] is True
    assert states(state)["a"] == "done"
    for flag in (False, True):  # the report follows study.json's option
        out = make_study(tmp_path / str(flag))
        study = json.loads((out / "study.json").read_text())
        (out / "study.json").write_text(json.dumps({**study, "pool_film": flag}))
        paths = write_report(out, n_boot=0)
        comparisons = set(pd.read_csv(paths.tables / "table2_test.csv")["comparison"])
        assert ("Film" in comparisons) is not flag
        assert ("pooled into Photos" in paths.md.read_text()) is flag
    for bad, message in (
        ({"pool": True}, r"unknown key\(s\) \['pool'\]"),
        ({"pool_film": "yes"}, "true or false"),
    ):
        with pytest.raises(StageError, match=message):
            parse_study({**STUDY, "report": bad})


def test_status_shows_a_stage_whose_process_is_gone_as_stopped(tmp_path):
    """study.json says `running` until the next run; status tells a live stage (its lock held) from
    one whose process was killed (lock free), and leaves SLURM's to the scheduler."""
    from filelock import FileLock
    from typer.testing import CliRunner

    from chextrain.cli import build_app
    from chextrain.training.study_run import stage_lock

    run(parse_study(STUDY), tmp_path, FakeTrain())
    path = tmp_path / "out" / "study.json"
    state = json.loads(path.read_text())
    for record in state["stages"]:
        if record["name"] in ("a", "solo", "b"):
            record["state"] = "running"
        if record["name"] == "b":
            record["executor"] = "slurm"  # no job_id: nothing asks SLURM
    path.write_text(json.dumps(state))
    live = FileLock(str(stage_lock(tmp_path / "out", "solo").lock_file))
    with live:  # solo's process is alive; a's was killed
        shown = {s["name"]: s for s in study_status(tmp_path / "out")}
        table = CliRunner().invoke(build_app(), ["study", "status", str(tmp_path / "out")])
    assert {n: shown[n]["state"] for n in ("a", "solo", "b", "c")} == {
        "a": "stopped",
        "solo": "running",
        "b": "running",
        "c": "done",
    }
    assert "resumes it" in shown["a"]["reason"]
    assert table.exit_code == 0 and "stopped" in table.output
    assert json.loads(path.read_text()) == state  # status changes nothing on disk
    assert states(run(parse_study(STUDY), tmp_path, FakeTrain()))["a"] == "done"  # the run resumes it
