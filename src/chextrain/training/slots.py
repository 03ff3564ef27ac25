"""Local slots: a process per slot, started once, that runs the slot's stages one after another.

`WarmSlot` has the submit / done / result interface of a submitit executor and its jobs, so
executors.run_local drives it as it would drive submitit's LocalExecutor. A job is any picklable
callable with a `name` (executors.StageJob). `cuda_visible_devices` numbers a slot's GPUs within
the scheduler's own CUDA_VISIBLE_DEVICES.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from chextrain.errors import ChextrainError

WAIT_S = 0.25  # how often SlotJob.result looks for the answer


class ExecutorError(ChextrainError):
    """An executor cannot run the study as asked (bad slots, GPUs, resources)."""


class SlotJob:
    """A stage handed to a WarmSlot: done() / result() / job_id, as a submitit job has."""

    def __init__(self, slot: WarmSlot, name: str) -> None:
        self.slot, self.name = slot, name
        self.job_id = str(slot.process.pid)
        self._outcome: tuple[bool, str] | None = None

    def done(self) -> bool:
        if self._outcome is None and (self.slot.conn.poll() or not self.slot.process.is_alive()):
            self._outcome = self.slot.receive()
        return self._outcome is not None

    def result(self) -> str:
        while not self.done():
            time.sleep(WAIT_S)
        assert self._outcome is not None
        ok, text = self._outcome
        if not ok:
            raise ExecutorError(text)
        return text


class WarmSlot:
    """One local slot: a process started once, which imports torch and Lightning while it waits,
    then runs the slot's stages one after another (as inline runs all of them in one process).

    A process per stage would pay those imports (about 6 s on one core) and two Python starts
    (submitit's controller and its job) every time. The process sees only the slot's GPUs
    (CUDA_VISIBLE_DEVICES, set before torch starts); a stage that asks for other GPUs gets a fresh
    process. Each stage's output goes to `jobs/<stage>.log`. A process that dies (killed, out of
    memory) ends its stage without a result, and the slot starts a fresh one for the next stage.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.gpus: tuple[int, ...] | None = None
        self.process: Any = None
        self.conn: Any = None

    def update_parameters(self, *, visible_gpus: Sequence[int] = (), **_: Any) -> None:
        gpus = tuple(int(g) for g in visible_gpus)
        if self.process is None or gpus != self.gpus or not self.process.is_alive():
            self.close()
            self.gpus = gpus
            ctx = multiprocessing.get_context("spawn")  # never fork a process that may hold CUDA
            self.conn, child = ctx.Pipe()
            self.process = ctx.Process(target=_slot_main, args=(child, gpus), name="chextrain-slot")
            self.process.start()
            child.close()

    def submit(self, job: Any) -> SlotJob:
        if self.process is None:
            self.update_parameters()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.conn.send((job, str(self.folder / f"{job.name}.log")))
        return SlotJob(self, job.name)

    def receive(self) -> tuple[bool, str]:
        try:
            return self.conn.recv()
        except (EOFError, OSError):
            self.process.join(timeout=5)
            code = self.process.exitcode
            self.close()
            return False, f"the slot's process ended without a result (exit code {code})"

    def close(self) -> None:
        if self.process is None:
            return
        if self.process.is_alive():
            try:
                self.conn.send(None)  # finish: the process exits after the stage it runs, if any
            except OSError:
                pass
            self.process.join(timeout=30)
            if self.process.is_alive():
                self.process.terminate()
                self.process.join()
        self.conn.close()
        self.process = self.conn = None


def cuda_visible_devices(gpus: Sequence[int], inherited: str | None) -> str:
    """CUDA_VISIBLE_DEVICES for a slot whose GPUs are `gpus`, numbered as the scheduler's torch
    numbers them: within the scheduler's own CUDA_VISIBLE_DEVICES when it has one (GPU 0 of a
    scheduler started with `CUDA_VISIBLE_DEVICES=2,3` is device 2), else the machine's."""
    given = [d.strip() for d in inherited.split(",") if d.strip()] if inherited else []
    if not given:
        return ",".join(str(g) for g in gpus)
    return ",".join(given[g] for g in gpus if 0 <= g < len(given))


def _slot_main(conn: Any, gpus: tuple[int, ...]) -> None:
    """A slot process: take (StageJob, log path) from the pipe, run it, answer (ok, text); None ends."""
    os.environ["CUDA_VISIBLE_DEVICES"] = cuda_visible_devices(gpus, os.environ.get("CUDA_VISIBLE_DEVICES"))
    import lightning.pytorch  # noqa: F401  (the imports a stage needs, paid once while waiting)

    import chextrain.training.lifecycle  # noqa: F401

    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the scheduler went away
            return
        if message is None:
            return
        job, log_path = message
        with open(log_path, "ab", buffering=0) as log_file:
            sys.stdout.flush()
            sys.stderr.flush()
            saved = os.dup(1), os.dup(2)
            os.dup2(log_file.fileno(), 1)
            os.dup2(log_file.fileno(), 2)
            try:
                answer = (True, str(job()))
            except Exception as exc:  # answered to the scheduler, which logs it
                answer = (False, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
                os.close(saved[0])
                os.close(saved[1])
        conn.send(answer)
