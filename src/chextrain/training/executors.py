"""Where a study's stages run: inline (one after another here), local slots, or SLURM via submitit.

- `inline` is study_run.run_study: this process, in dependency order.
- `local` (run_local) keeps up to N stages running at once on this machine, each slot a process of
  its own (WarmSlot) that runs its stages one after another; on a GPU box each slot gets its own
  GPUs (CUDA_VISIBLE_DEVICES), K per stage.
- `slurm` (submit_slurm) submits each stage as a SLURM job through submitit, with `afterok`
  dependencies along the DAG, and returns: study.json records the job ids, `study status` asks the
  scheduler. A job that SLURM preempts or that runs out of time is requeued by submitit
  (StageJob.checkpoint) and resumes from its last checkpoint, as a killed local stage does.

Every job runs study_run.run_one, under the stage's file lock, so a stage never runs twice at
once whatever starts it. Jobs of a submitit executor without dependencies (the local executor, used
for testing the SLURM path) wait for their dependencies' done.json instead.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit

from chextrain.training.slots import JOBS_DIR, ExecutorError, WarmSlot
from chextrain.training.specs import ResourcesSpec
from chextrain.training.study import Study
from chextrain.training.study_run import (
    Log,
    StudyState,
    blocked_reason,
    finish_notes,
    run_one,
    stage_dir,
    wanted_stages,
)

EXECUTORS: tuple[str, ...] = ("inline", "local", "slurm")
POLL_S = 0.25


@dataclass
class StageJob(submitit.helpers.Checkpointable):
    """One stage of a study, as a submitit job (pickled, run in its own process or SLURM task).

    wait_for_deps: poll the dependencies' state before starting (for executors without
    scheduler dependencies); a failed or blocked dependency ends the job as `blocked`.
    Checkpointable: when SLURM preempts the job or its time runs out, submitit requeues this same
    callable, and the stage resumes from its last checkpoint.
    """

    study: Study
    name: str
    data_root: Path
    out_dir: Path
    wait_for_deps: bool = False
    threads: int | None = None  # CPU threads of this process (slots share a machine's cores)

    def __call__(self) -> str:
        if self.threads is not None:
            import torch

            torch.set_num_threads(self.threads)
        state = StudyState(self.study, self.out_dir)
        if self.wait_for_deps:
            while True:
                records = state.records()
                reason = blocked_reason(self.study, self.name, records)
                if reason:
                    state.update(self.name, state="blocked", reason=reason)
                    return "blocked"
                if all(records[d]["state"] == "done" for d in self.study.deps[self.name]):
                    break
                time.sleep(POLL_S)
        return run_one(self.study, self.name, self.data_root, self.out_dir, progress=False)


def gpu_slots(slots: int, gpus_per_stage: int, visible: Sequence[int]) -> list[tuple[int, ...]]:
    """The GPUs of each slot: consecutive groups of `gpus_per_stage` from `visible` (none on CPU)."""
    if slots < 1:
        raise ExecutorError(f"--slots {slots}: expected 1 or more")
    if gpus_per_stage <= 0 or not visible:
        return [()] * slots
    if slots * gpus_per_stage > len(visible):
        raise ExecutorError(
            f"--slots {slots} x --gpus-per-stage {gpus_per_stage} needs "
            f"{slots * gpus_per_stage} GPUs; this machine has {len(visible)}"
        )
    return [tuple(visible[i * gpus_per_stage : (i + 1) * gpus_per_stage]) for i in range(slots)]


def run_local(
    study: Study,
    data_root: Path,
    out_dir: Path,
    *,
    slots: int,
    only: Sequence[str] | None = None,
    gpus_per_stage: int | None = None,
    visible_gpus: Sequence[int] = (),
    log: Log = print,
    make_executor: Callable[[Path], Any] | None = None,
) -> dict[str, Any]:
    """Run the study with up to `slots` stages at once, each slot a process; returns study.json.

    A stage starts when its dependencies are done; a failure blocks its dependants only. A stage's
    GPUs: `gpus_per_stage`, else its own `devices` when a whole number, else 1 (on a GPU box).
    make_executor(folder) makes a slot's executor (default WarmSlot; submitit's LocalExecutor
    fits too, a fresh process per stage).
    """
    todo = wanted_stages(study, only)
    state = StudyState.start(study, data_root, out_dir)
    per_stage = gpus_per_stage if gpus_per_stage is not None else 1
    folder = Path(out_dir) / JOBS_DIR
    slot_gpus = gpu_slots(slots, per_stage if visible_gpus else 0, visible_gpus)
    executors = [(make_executor or WarmSlot)(folder) for _ in slot_gpus]
    free = list(range(len(slot_gpus)))
    running: dict[str, tuple[Any, int]] = {}
    pending = [n for n in todo if not _done(state.records()[n], out_dir)]
    for name in todo:
        if name not in pending:
            log(f"{name}: done (cached)")
    try:
        while pending or running:
            for name, (job, slot) in list(running.items()):
                if job.done():
                    outcome, reason = _job_result(job), state.records()[name].get("reason")
                    log(
                        f"{name}: {outcome}"
                        + (f" ({reason}; log: {folder / name}.log)" if outcome != "done" and reason else "")
                    )
                    free.append(slot)
                    del running[name]
            records = state.records()
            for name in list(pending):
                reason = blocked_reason(study, name, records)
                if reason:
                    state.update(name, state="blocked", reason=reason, metrics={})
                    log(f"{name}: blocked: {reason}")
                    pending.remove(name)
                elif free and all(
                    records[d]["state"] == "done" and d not in running for d in study.deps[name]
                ):
                    # A dependency counts once its process has ended its stage, not when its record
                    # says done: the record is written just before, and its GPUs are free only after.
                    slot = free.pop(0)
                    gpus, stage = slot_gpus[slot], study.stages[name]
                    n_gpus = (
                        len(gpus)
                        if gpus_per_stage is not None or not isinstance(stage.devices, int)
                        else min(len(gpus), stage.devices)
                    )
                    executors[slot].update_parameters(
                        name=f"chextrain-{name}",
                        timeout_min=7 * 24 * 60,
                        gpus_per_node=n_gpus,
                        visible_gpus=gpus[:n_gpus],
                    )
                    job = StageJob(study, name, data_root, out_dir, threads=max(1, _cpus() // slots))
                    running[name] = (executors[slot].submit(job), slot)
                    job_id = str(running[name][0].job_id)
                    state.update(name, executor="local", job_id=job_id)
                    log(
                        f"{name} ({stage.title}) started in slot {slot + 1} (process {job_id}"
                        + (f", GPUs {list(gpus[:n_gpus])})" if gpus else ")")
                    )
                    pending.remove(name)
            if not pending:  # a free slot gets no more stages: let its process go now
                for slot in free:
                    _finish(executors[slot])
            time.sleep(POLL_S if running else 0)
    finally:
        for executor in executors:  # all told first, so their exits overlap
            _finish(executor)
        for executor in executors:
            if hasattr(executor, "close"):
                executor.close()
    return finish_notes(study, state)


def _finish(executor: Any) -> None:
    """Tell a slot it gets no more stages (WarmSlot.finish; submitit's executors have nothing to end)."""
    if hasattr(executor, "finish"):
        executor.finish()


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def local_executor(folder: Path) -> Any:
    """submitit's LocalExecutor: each job a process of its own (logs under `folder`)."""
    return submitit.LocalExecutor(folder=str(folder))


def _done(record: Mapping[str, Any], out_dir: Path) -> bool:
    return record["state"] == "done" and (stage_dir(out_dir, record["name"]) / "done.json").exists()


def _job_result(job: Any) -> str:
    try:
        return str(job.result())
    except Exception as exc:  # the process died (killed, out of memory): the stage resumes on re-run
        return f"job {job.job_id} ended without a result ({type(exc).__name__}: {str(exc).splitlines()[0]})"


def sbatch_parameters(
    resources: ResourcesSpec, stage_devices: int | str, name: str, nodes: int = 1
) -> dict[str, Any]:
    """submitit SlurmExecutor parameters of a stage: one task per GPU (Lightning's SLURM DDP)."""
    gpus = resources.gpus_per_node
    if gpus is None:
        gpus = stage_devices if isinstance(stage_devices, int) else 1
    params: dict[str, Any] = {
        "job_name": f"chextrain-{name}",
        "nodes": nodes,
        "ntasks_per_node": max(1, gpus),
        "gpus_per_node": gpus,
        "cpus_per_task": resources.cpus_per_task,
        "time": resources.time_min,
        "signal_delay_s": 120,
    }
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(resources, key) is not None:
            params[key] = getattr(resources, key)
    if resources.mem_gb is not None:
        params["mem"] = f"{resources.mem_gb}GB"
    return params


def sbatch_flags(params: Mapping[str, Any]) -> list[str]:
    """The sbatch command-line flags of submitit parameters (what the job script's #SBATCH lines say)."""
    flags = []
    for key, value in params.items():
        if key == "signal_delay_s":  # submitit asks for USR2 that long before the time limit
            flags.append(f"--signal=USR2@{value}")
        else:
            flags.append(f"--{key.replace('_', '-')}={value}")
    return flags


def submit_slurm(
    study: Study,
    data_root: Path,
    out_dir: Path,
    *,
    only: Sequence[str] | None = None,
    dry_run: bool = False,
    log: Log = print,
    make_executor: Callable[[Path], Any] | None = None,
) -> list[dict[str, Any]]:
    """Submit the study's unfinished stages as SLURM jobs with afterok dependencies; returns the jobs.

    Stages already done, or queued / running under a job SLURM still knows, are not submitted
    again. `dry_run` prints each job's sbatch parameters and dependencies instead. make_executor
    (tests: submitit's LocalExecutor) replaces the SLURM one; jobs then wait for their dependencies.
    """
    todo = wanted_stages(study, only)
    state = None if dry_run else StudyState.start(study, data_root, out_dir)
    records = state.records() if state else {}
    folder = Path(out_dir) / JOBS_DIR
    job_ids: dict[str, str] = {}
    jobs: list[dict[str, Any]] = []
    for name in todo:
        record = records.get(name, {})
        if record and _done(record, out_dir):
            log(f"{name}: done (cached)")
            continue
        if record.get("job_id") and record.get("executor") == "slurm" and _alive(record["job_id"], folder):
            job_ids[name] = record["job_id"]
            log(f"{name}: already {record['state']} as job {record['job_id']}")
            continue
        stage = study.stages[name]
        params = sbatch_parameters(stage.resources or ResourcesSpec(), stage.devices, name, stage.num_nodes)
        after = [job_ids[d] for d in study.deps[name] if d in job_ids]
        if after:
            params["dependency"] = "afterok:" + ":".join(after)
        if dry_run:
            job_ids[name] = f"<{name}>"
            jobs.append({"stage": name, "job_id": None, "params": params})
            log(f"{name}: sbatch {' '.join(sbatch_flags(params))}")
            continue
        executor = make_executor(folder) if make_executor else submitit.SlurmExecutor(folder=str(folder))
        local = make_executor is not None
        executor.update_parameters(**(_local_parameters(params) if local else params))
        job = executor.submit(StageJob(study, name, data_root, out_dir, wait_for_deps=local))
        job_ids[name] = str(job.job_id)
        assert state is not None
        state.update(name, state="queued", executor="slurm", job_id=job_ids[name], reason="")
        jobs.append({"stage": name, "job_id": job_ids[name], "params": params, "job": job})
        log(f"{name}: submitted as job {job.job_id}" + (f" ({params['dependency']})" if after else ""))
    return jobs


def _local_parameters(params: Mapping[str, Any]) -> dict[str, Any]:
    """The SLURM parameters a LocalExecutor understands (for running the SLURM path locally)."""
    return {"name": params["job_name"], "timeout_min": params["time"], "gpus_per_node": 0}


def _alive(job_id: str, folder: Path) -> bool:
    """Whether SLURM still has job_id pending or running (sacct through submitit)."""
    state = slurm_state(job_id, folder)
    return state in ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING", "SUSPENDED")


def slurm_state(job_id: str, folder: Path) -> str:
    """SLURM's state of a job ("UNKNOWN" when the scheduler cannot be asked)."""
    try:
        return str(submitit.SlurmJob(folder=str(folder), job_id=job_id).state)
    except Exception:  # no sacct here, or the job is too old for the accounting database
        return "UNKNOWN"


SLURM_STATES = {
    "PENDING": "queued",
    "REQUEUED": "queued",
    "CONFIGURING": "queued",
    "RUNNING": "running",
    "COMPLETING": "running",
    "SUSPENDED": "queued",
    "FAILED": "failed",
    "CANCELLED": "failed",
    "TIMEOUT": "failed",
    "OUT_OF_MEMORY": "failed",
    "NODE_FAIL": "failed",
    "PREEMPTED": "queued",
}


def scheduler_status(stages: Sequence[Mapping[str, Any]], out_dir: Path) -> list[dict[str, Any]]:
    """Stage records (study.json) with the scheduler's word on SLURM jobs not finished in their folder.

    A record of a queued or running SLURM job gets `scheduler` (SLURM's state) and, where SLURM
    knows the job, the state it implies (queued, running, failed); done and failed records as is.
    """
    folder = Path(out_dir) / JOBS_DIR
    out = []
    for record in stages:
        record = dict(record)
        if (
            record.get("executor") == "slurm"
            and record.get("job_id")
            and record["state"] in ("queued", "running")
        ):
            slurm = slurm_state(str(record["job_id"]), folder)
            record["scheduler"] = slurm
            base = slurm.split()[0] if slurm else slurm
            if base in SLURM_STATES:
                record["state"] = SLURM_STATES[base]
                if record["state"] == "failed":
                    record["reason"] = f"SLURM job {record['job_id']}: {slurm}"
        out.append(record)
    return out
