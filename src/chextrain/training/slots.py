"""Local slots: a process per slot, started once, that runs the slot's stages one after another.

`WarmSlot` has the submit / done / result interface of a submitit executor and its jobs, so
executors.run_local drives it as it would drive submitit's LocalExecutor. A job is any picklable
callable with a `name` (executors.StageJob). `cuda_visible_devices` numbers a slot's GPUs within
the scheduler's own CUDA_VISIBLE_DEVICES.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from chextrain.errors import ChextrainError

WAIT_S = 0.25  # how often SlotJob.result looks for the answer
JOBS_DIR = "jobs"  # the slots' logs (and submitit's pickled jobs) inside the study folder


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


PRELOAD = ("lightning.pytorch", "chextrain.training.lifecycle")  # what a slot imports while it waits


class WarmSlot:
    """One local slot: a process started once, which imports torch and Lightning while it waits,
    then runs the slot's stages one after another (as inline runs all of them in one process).

    A process per stage would pay those imports (about 6 s on one core) and two Python starts
    (submitit's controller and its job) every time. `start_slots` starts them before the scheduler
    reads the study, so the two import at once. A slot's GPUs are bound at its first stage:
    CUDA_VISIBLE_DEVICES is set in the process before the stage runs, which is before CUDA starts
    (the imports above do not start it: tests/test_executors.py checks). A stage that asks for
    other GPUs than the process was bound to gets a fresh process. Each stage's output goes to
    `jobs/<stage>.log`. A process that dies (killed, out of memory) ends its stage without a
    result, and the slot starts a fresh one for the next stage.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.gpus: tuple[int, ...] | None = None  # None: not bound yet (no stage run)
        self.process: Any = None
        self.conn: Any = None
        self.finishing = False  # told to exit: takes no more stages

    def start(self) -> WarmSlot:
        """Start the process, not bound to GPUs yet (if it is not running)."""
        if self.process is None:
            ctx = multiprocessing.get_context("spawn")  # never fork a process that may hold CUDA
            self.conn, child = ctx.Pipe()
            self.process = ctx.Process(target=_slot_main, args=(child,), name="chextrain-slot")
            self.process.start()
            child.close()
        return self

    def update_parameters(self, *, visible_gpus: Sequence[int] = (), **_: Any) -> None:
        """Bind the slot to `visible_gpus` for its next stage (a fresh process if it was bound to others)."""
        gpus = tuple(int(g) for g in visible_gpus)
        alive = self.process is not None and not self.finishing and self.process.is_alive()
        if not alive or self.gpus not in (None, gpus):
            self.close()
        self.start()
        self.gpus = gpus

    def submit(self, job: Any) -> SlotJob:
        if self.gpus is None:
            self.update_parameters()
        self.folder.mkdir(parents=True, exist_ok=True)
        visible = cuda_visible_devices(self.gpus or (), os.environ.get("CUDA_VISIBLE_DEVICES"))
        try:
            self.conn.send((job, str(self.folder / f"{job.name}.log"), visible))
        except OSError:  # the process died before the stage reached it: the job's result says so
            pass
        return SlotJob(self, job.name)

    def receive(self) -> tuple[bool, str]:
        try:
            return self.conn.recv()
        except (EOFError, OSError):
            self.process.join(timeout=5)
            code = self.process.exitcode
            self.close()
            return False, f"the slot's process ended without a result (exit code {code})"

    def finish(self) -> None:
        """Ask the process to exit after the stage it runs, if any, without waiting (see close)."""
        if self.process is not None and not self.finishing and self.process.is_alive():
            self.finishing = True
            try:
                self.conn.send(None)
            except OSError:
                pass

    def close(self) -> None:
        """Finish and wait for the process (30 s, then it is terminated). Finishing every slot
        first, then closing each, lets their exits overlap."""
        if self.process is None:
            return
        self.finish()
        self.process.join(timeout=30)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join()
        self.conn.close()
        self.process = self.conn = self.gpus = None
        self.finishing = False

    def kill(self) -> None:
        """End the process now (the scheduler stops before giving it a stage)."""
        if self.process is not None and self.process.is_alive():
            self.process.terminate()
        self.close()


def start_slots(n: int, folder: Path) -> list[WarmSlot]:
    """N slots whose processes start importing now (for run_local's make_executor)."""
    return [WarmSlot(folder).start() for _ in range(max(0, n))]


def cuda_visible_devices(gpus: Sequence[int], inherited: str | None) -> str:
    """CUDA_VISIBLE_DEVICES for a slot whose GPUs are `gpus`, numbered as the scheduler's torch
    numbers them: within the scheduler's own CUDA_VISIBLE_DEVICES when it has one (GPU 0 of a
    scheduler started with `CUDA_VISIBLE_DEVICES=2,3` is device 2), else the machine's."""
    given = [d.strip() for d in inherited.split(",") if d.strip()] if inherited else []
    if not given:
        return ",".join(str(g) for g in gpus)
    return ",".join(given[g] for g in gpus if 0 <= g < len(given))


def _slot_main(conn: Any) -> None:
    """A slot process: take (StageJob, log path, CUDA_VISIBLE_DEVICES) from the pipe, run the job
    with those GPUs visible, answer (ok, text); None ends the process.

    Ctrl-C reaches every process of the terminal's group: the scheduler says it stopped, and a
    slot ends quietly (exit code 130, no traceback; a stage it ran resumes from its checkpoint)."""
    try:
        _serve(conn)
    except KeyboardInterrupt:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)


def _serve(conn: Any) -> None:
    import importlib

    for module in PRELOAD:  # the imports a stage needs, paid once while waiting
        importlib.import_module(module)
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the scheduler went away
            return
        if message is None:  # every stage's files are written and closed: skip the interpreter's
            logging.shutdown()  # teardown of torch and Lightning (seconds per slot)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
        job, log_path, visible = message
        os.environ["CUDA_VISIBLE_DEVICES"] = visible  # before the stage starts CUDA (same for every stage)
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
