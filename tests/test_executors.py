"""Executors: local slots run stages at once and respect the DAG; the SLURM path through submitit
(local processes, and the sbatch script a fake `sbatch` receives); stages never run twice at once."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from chextrain.evaluation.report import write_report
from chextrain.training.executors import (
    ExecutorError,
    gpu_slots,
    local_executor,
    run_local,
    sbatch_parameters,
    submit_slurm,
)
from chextrain.training.slots import PRELOAD, WarmSlot, cuda_visible_devices, start_slots
from chextrain.training.specs import ResourcesSpec
from chextrain.training.study import load_study, parse_study
from chextrain.training.study_run import read_state, run_study

ROOT = Path(__file__).resolve().parents[1]
STUDY = {
    "name": "par",
    "defaults": {
        "backbone": "tiny",
        "init": "random",
        "image_size": 32,
        "batch_size": 8,
        "num_workers": 0,
        "optimizer": {"name": "adam", "lr": 1.0e-3},
        "max_steps": 2,
        "evaluate": [],
    },
    "resources": {"partition": "gpu8", "time_min": 90, "cpus_per_task": 6, "mem_gb": 64},
    "stages": [
        {"name": "a", "data": {"train": ["chexpert"]}},
        {"name": "b", "data": {"train": ["chexphoto"]}},
        {
            "name": "c",
            "init": "stage:a",
            "data": {"train": ["chexphoto"]},
            "resources": {"partition": "long", "gpus_per_node": 4},
        },
    ],
}


def records(out: Path) -> dict[str, dict]:
    return {s["name"]: s for s in read_state(out)["stages"]}


@pytest.mark.slow
def test_two_slots_overlap_independent_stages_and_keep_the_dag(tmp_path: Path, demo_root: Path) -> None:
    out, study, lines = tmp_path / "out", json.loads(json.dumps(STUDY)), []
    state = run_local(parse_study(study), demo_root, out, slots=2, log=lines.append)
    rec = {s["name"]: s for s in state["stages"]}
    assert {n: r["state"] for n, r in rec.items()} == {"a": "done", "b": "done", "c": "done"}
    assert all(r["executor"] == "local" and r["pid"] != os.getpid() for r in rec.values())  # own processes
    assert rec["a"]["pid"] != rec["b"]["pid"]
    # Both independent stages are handed to their own processes before either has ended (the
    # scheduler's order, not wall-clock stamps: on a loaded machine one tiny stage may well end
    # before the other process has imported torch).
    started = [i for i, line in enumerate(lines) if " started in slot " in line]
    ended = [i for i, line in enumerate(lines) if line.startswith(("a: ", "b: "))]
    assert len(started) == 3 and lines[started[0]].startswith("a (") and lines[started[1]].startswith("b (")
    assert started[1] < min(ended)
    c_start = started[2]
    assert lines[c_start].startswith("c (") and any(lines[i].startswith("a: ") for i in ended if i < c_start)
    assert rec["c"]["started"] >= rec["a"]["finished"]  # c needs a
    for name in "abc":
        assert json.loads((out / "stages" / name / "done.json").read_text())["stage"] == name
    again = run_local(parse_study(study), demo_root, out, slots=2, log=lambda s: None)
    assert [s["finished"] for s in again["stages"]] == [rec[n]["finished"] for n in ("a", "b", "c")]  # cached


@pytest.mark.slow
def test_a_failed_stage_blocks_only_its_dependants_in_slots(tmp_path: Path, demo_root: Path) -> None:
    broken = json.loads(json.dumps(STUDY))
    broken["stages"][0]["data"] = {"train": ["other"]}  # no rows: stage a fails
    broken["defaults"]["evaluate"] = ["test"]
    state = run_local(parse_study(broken), demo_root, tmp_path / "out", slots=2, log=lambda s: None)
    states = {s["name"]: (s["state"], s["reason"]) for s in state["stages"]}
    assert states["a"][0] == "failed" and "no training rows" in states["a"][1]
    assert states["b"][0] == "done" and states["c"] == ("blocked", "needs a (failed)")
    # The report waits for nothing: it reports b and marks the stages without numbers.
    report = write_report(tmp_path / "out", n_boot=20).md.read_text()
    assert "| b | b | done |" in report and "| a | a | failed |" in report and "| c | c | blocked |" in report
    assert "2 stage(s) did not finish and have no numbers" in report


@pytest.mark.slow
def test_a_stage_killed_inside_a_local_slot_resumes_on_rerun(tmp_path: Path, demo_root: Path) -> None:
    study = json.loads(json.dumps(STUDY))
    study["stages"] = [{**study["stages"][0], "max_steps": 40, "checkpoint_every_n_steps": 1}]
    path, out = tmp_path / "s.yaml", tmp_path / "out"
    path.write_text(json.dumps(study))
    code = (
        "from chextrain.training.study import load_study\n"
        "from chextrain.training.executors import run_local\n"
        f"run_local(load_study({str(path)!r}), {str(demo_root)!r}, {str(out)!r}, slots=1)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", code],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ckpt, deadline = out / "stages" / "a" / "checkpoints" / "last.ckpt", time.time() + 240
    while not ckpt.exists():
        assert parent.poll() is None and time.time() < deadline, "the stage ended before its first checkpoint"
        time.sleep(0.05)
    os.killpg(parent.pid, signal.SIGKILL)  # the scheduler and its stage process, mid-stage
    parent.wait()
    time.sleep(0.5)
    assert not (out / "stages" / "a" / "done.json").exists()
    state = run_local(load_study(path), demo_root, out, slots=1, log=lambda s: None)
    assert state["stages"][0]["state"] == "done"
    assert json.loads((out / "stages" / "a" / "done.json").read_text())["resumed"] is True


@pytest.mark.slow
def test_slurm_path_through_submitits_local_processes(tmp_path: Path, demo_root: Path) -> None:
    out = tmp_path / "out"
    jobs = submit_slurm(parse_study(STUDY), demo_root, out, log=lambda s: None, make_executor=local_executor)
    assert [j["stage"] for j in jobs] == ["a", "b", "c"]
    assert jobs[2]["params"]["dependency"] == f"afterok:{jobs[0]['job_id']}"
    assert {r["state"] for r in records(out).values()} <= {"queued", "running", "done"}
    for job in jobs:
        assert job["job"].result() == "done"
    rec = records(out)
    assert {n: r["state"] for n, r in rec.items()} == {"a": "done", "b": "done", "c": "done"}
    assert rec["c"]["started"] >= rec["a"]["finished"]  # the job waited for its dependency
    assert (
        submit_slurm(parse_study(STUDY), demo_root, out, log=lambda s: None, make_executor=local_executor)
        == []
    )  # nothing left to submit


class LingeringExecutor:
    """Jobs that write their `done` record at once but whose process lingers for a few polls (as a
    stage process does while it exits): the scheduler must wait for the process, not the record."""

    def __init__(self, folder: Path) -> None:
        self.params: dict = {}

    def update_parameters(self, **params: object) -> None:
        self.params = params

    def submit(self, job: object) -> object:
        from chextrain.training.study_run import StudyState

        StudyState(job.study, job.out_dir).update(job.name, state="done", finished=time.time())

        class Lingering:
            job_id, polls = job.name, 3 if job.name == "a" else 0  # b's process ends first

            def done(self) -> bool:
                self.polls -= 1
                return self.polls < 0

            def result(self) -> str:
                return "done"

        return Lingering()


def test_a_dependant_waits_for_its_dependencys_process_not_only_its_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import chextrain.training.executors as executors

    monkeypatch.setattr(executors, "POLL_S", 0.0)
    lines: list[str] = []
    run_local(
        parse_study(STUDY),
        tmp_path / "data",
        tmp_path / "out",
        slots=2,
        log=lines.append,
        make_executor=LingeringExecutor,
    )
    assert lines.index("a: done") < lines.index("c (c) started in slot 2 (process c)")


class Dies:
    """A job whose process dies under it (as when the kernel kills it for memory)."""

    name = "dies"

    def __call__(self) -> str:
        os._exit(3)


class Says:
    """A job that prints a line (into its log) and ends."""

    name = "says"

    def __call__(self) -> str:
        print("hello from the slot", flush=True)
        return f"done in {os.getpid()}"


def test_a_warm_slot_survives_a_dead_process_and_logs_each_stage(tmp_path: Path) -> None:
    slot = WarmSlot(tmp_path / "jobs")
    try:
        slot.update_parameters(visible_gpus=())
        first = slot.process.pid
        job = slot.submit(Dies())
        with pytest.raises(ExecutorError, match="ended without a result \\(exit code 3\\)"):
            job.result()
        slot.update_parameters(visible_gpus=())  # a fresh process for the next stage
        assert slot.process.pid != first
        assert slot.submit(Says()).result() == f"done in {slot.process.pid}"
        assert slot.submit(Says()).result() == f"done in {slot.process.pid}"  # the same process again
        assert (tmp_path / "jobs" / "says.log").read_text().count("hello from the slot") == 2
        slot.update_parameters(visible_gpus=())
        os.kill(slot.process.pid, signal.SIGKILL)  # dies after it was chosen, before the stage reaches it
        slot.process.join()
        with pytest.raises(ExecutorError, match="ended without a result \\(exit code -9\\)"):
            slot.submit(Says()).result()
        slot.update_parameters(visible_gpus=())
        finishing = slot.process
        slot.finish()  # no more stages: the process exits on its own, without the interpreter's teardown
        slot.finish()  # asking twice is harmless
        finishing.join(timeout=120)
        assert finishing.exitcode == 0
        slot.update_parameters(visible_gpus=())  # a finished slot given a stage starts a fresh process
        assert slot.process is not finishing and slot.submit(Says()).result() == f"done in {slot.process.pid}"
    finally:
        slot.close()
    assert slot.process is None


def test_ctrl_c_ends_a_slot_quietly(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """Ctrl-C reaches the slots too (the terminal's process group): they end with 130, no traceback."""
    slot = WarmSlot(tmp_path / "jobs")
    try:
        assert slot.submit(Says()).result().startswith("done in")  # imported, waiting for a stage
        os.kill(slot.process.pid, signal.SIGINT)
        slot.process.join(timeout=120)
        assert slot.process.exitcode == 130
        assert "Traceback" not in capfd.readouterr().err
    finally:
        slot.close()


class Sees:
    """A job that answers the GPUs its process sees and its process id."""

    name = "sees"

    def __call__(self) -> str:
        return f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r} in {os.getpid()}"


def test_a_started_slot_is_bound_to_its_gpus_at_its_first_stage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6")  # the scheduler's own devices
    slot, spare = start_slots(2, tmp_path / "jobs")
    try:
        started = slot.process.pid
        slot.update_parameters(visible_gpus=(1,))  # binding a started slot keeps its process
        assert slot.submit(Sees()).result() == f"'5' in {started}"
        slot.update_parameters(visible_gpus=(1,))
        assert slot.submit(Sees()).result() == f"'5' in {started}"
        slot.update_parameters(visible_gpus=(0, 2))  # other GPUs: a fresh process, which CUDA never saw
        assert slot.process.pid != started and slot.submit(Sees()).result() == f"'4,6' in {slot.process.pid}"
        waiting = spare.process
        spare.kill()  # a slot the scheduler never used ends at once
        assert spare.process is None and not waiting.is_alive()
    finally:
        slot.close()
        spare.close()


PROBE_CUDA = """
import importlib, sys, torch
calls = []
def record(name, f):
    def wrapper(*args, **kwargs):
        calls.append(name)
        return f(*args, **kwargs)
    return wrapper
for name in ("device_count", "is_available", "init", "_lazy_init", "current_device", "get_device_properties"):
    setattr(torch.cuda, name, record(name, getattr(torch.cuda, name)))
torch._C._cuda_getDeviceCount = record("_cuda_getDeviceCount", torch._C._cuda_getDeviceCount)
for module in sys.argv[1:]:
    importlib.import_module(module)
assert not calls and not torch.cuda.is_initialized(), f"CUDA asked while importing: {calls}"
"""


def test_what_a_slot_imports_while_it_waits_does_not_ask_cuda() -> None:
    """A slot imports PRELOAD before it knows its GPUs and sets CUDA_VISIBLE_DEVICES at its first stage.
    That is right only while those imports never ask CUDA anything (a device count starts the driver,
    which then keeps the devices it saw), so each such call is recorded; a probe that asks must fail."""
    run = subprocess.run(
        [sys.executable, "-c", PROBE_CUDA, *PRELOAD], capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-2000:]
    asks = subprocess.run(
        [
            sys.executable,
            "-c",
            PROBE_CUDA.replace("for module", "torch.cuda.is_available()\nfor module"),
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert asks.returncode != 0 and "CUDA asked while importing: ['is_available'" in asks.stderr


def fake_slurm(tmp_path: Path) -> Path:
    """`sbatch` that records each script and answers with job ids 101, 102, ...; `sacct` knows none."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(
        "#!/bin/sh\nn=$(ls " + str(tmp_path / "scripts") + " | wc -l)\nid=$((101 + n))\n"
        'cp "$1" ' + str(tmp_path / "scripts") + '/$id.sh\necho "Submitted batch job $id"\n'
    )
    (bin_dir / "sacct").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")  # submitit checks that the cluster has it
    (tmp_path / "scripts").mkdir()
    for tool in ("sbatch", "sacct", "srun"):
        (bin_dir / tool).chmod((bin_dir / tool).stat().st_mode | stat.S_IEXEC)
    return bin_dir


def test_sbatch_scripts_carry_resources_and_afterok(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", f"{fake_slurm(tmp_path)}{os.pathsep}{os.environ['PATH']}")
    study = parse_study(STUDY, overrides=["resources.account=lab42"])
    jobs = submit_slurm(study, tmp_path / "data", tmp_path / "out", log=lambda s: None)
    assert [(j["stage"], j["job_id"]) for j in jobs] == [("a", "101"), ("b", "102"), ("c", "103")]
    scripts = {p.stem: p.read_text() for p in (tmp_path / "scripts").glob("*.sh")}
    a, c = scripts["101"], scripts["103"]
    for line in (
        "#SBATCH --partition=gpu8",
        "#SBATCH --time=90",
        "#SBATCH --cpus-per-task=6",
        "#SBATCH --mem=64GB",
        "#SBATCH --account=lab42",
        "#SBATCH --gpus-per-node=1",
        "#SBATCH --job-name=chextrain-a",
    ):
        assert line in a, line
    assert "#SBATCH --dependency" not in a
    for line in (
        "#SBATCH --partition=long",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --ntasks-per-node=4",
        "#SBATCH --dependency=afterok:101",
        "#SBATCH --account=lab42",
    ):
        assert line in c, line
    assert {n: (r["state"], r["job_id"]) for n, r in records(tmp_path / "out").items()} == {
        "a": ("queued", "101"),
        "b": ("queued", "102"),
        "c": ("queued", "103"),
    }


def test_dry_run_of_the_papers_study_lists_every_job_and_dependency(tmp_path: Path) -> None:
    study = load_study(
        ROOT / "configs" / "studies" / "chextraining.yaml", overrides=["resources.partition=gpu"]
    )
    lines: list[str] = []
    jobs = submit_slurm(study, tmp_path / "data", tmp_path / "out", dry_run=True, log=lines.append)
    assert len(jobs) == len(study.order) and not (tmp_path / "out").exists()
    by_stage = {j["stage"]: j["params"] for j in jobs}
    assert "dependency" not in by_stage["baseline"] and by_stage["baseline"]["partition"] == "gpu"
    assert by_stage["routed"]["dependency"] == "afterok:<mixed>"
    assert by_stage["moco_chexpert_ft_chexphoto"]["dependency"] == "afterok:<moco_chexpert>"
    assert any(
        line.startswith("routed: sbatch")
        and "--dependency=afterok:<mixed>" in line
        and "--partition=gpu" in line
        for line in lines
    )


def test_resources_are_checked_and_gpu_slots_split_the_visible_gpus() -> None:
    params = sbatch_parameters(ResourcesSpec(qos="high"), 2, "x")
    assert (params["gpus_per_node"], params["ntasks_per_node"], params["qos"]) == (2, 2, "high")
    with pytest.raises(Exception, match="resources.gpus_per_node"):
        parse_study({**STUDY, "resources": {"gpus_per_node": -1}})
    with pytest.raises(Exception, match="resources.partiton: unknown key"):
        parse_study({**STUDY, "resources": {"partiton": "gpu"}})
    assert gpu_slots(2, 2, [0, 1, 2, 3]) == [(0, 1), (2, 3)] and gpu_slots(3, 1, []) == [(), (), ()]
    with pytest.raises(ExecutorError, match="needs 4 GPUs; this machine has 3"):
        gpu_slots(2, 2, [0, 1, 2])


@pytest.mark.slow
def test_two_study_runs_on_one_folder_never_run_a_stage_twice(tmp_path: Path, demo_root: Path) -> None:
    study = json.loads(json.dumps(STUDY))
    study["stages"] = study["stages"][:2]
    path, out = tmp_path / "s.yaml", tmp_path / "out"
    path.write_text(json.dumps(study))
    code = (
        "from chextrain.training.study import load_study\n"
        "from chextrain.training.study_run import run_study\n"
        f"run_study(load_study({str(path)!r}), {str(demo_root)!r}, {str(out)!r}, progress=False)\n"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for _ in range(2)
    ]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs
    trained = [line for log in logs for line in log.splitlines() if ": done in " in line]
    assert sorted(line.split("] ")[-1].split(":")[0] for line in trained) == ["a", "b"]  # once each
    assert {n: r["state"] for n, r in records(out).items()} == {"a": "done", "b": "done"}
    assert all(json.loads((out / "stages" / n / "done.json").read_text())["resumed"] is False for n in "ab")
    assert (
        run_study(load_study(path), demo_root, out, progress=False, log=lambda s: None)["stages"][0]["state"]
        == "done"
    )


def test_a_slots_gpus_are_numbered_within_the_schedulers_own_visible_devices() -> None:
    assert cuda_visible_devices((0, 1), None) == "0,1" and cuda_visible_devices((), None) == ""
    assert cuda_visible_devices((0,), "2,3") == "2" and cuda_visible_devices((1,), "2, 3") == "3"
    assert cuda_visible_devices((0, 1), "GPU-aa,GPU-bb") == "GPU-aa,GPU-bb"  # UUIDs pass through
    assert cuda_visible_devices((), "2,3") == ""  # a CPU slot sees no GPU
