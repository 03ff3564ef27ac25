"""The prepared image store: every image decoded once, grey and resized, uint8, memory-mapped.

Decoding dominates the cost of feeding a GPU from JPEGs (a full-size CheXpert x-ray takes 20-30 ms
to decode; a 320 px row of the store is a 100 KB read). `ImageStore(root, decoding)` keeps, per
release (the folder above `train/`, `valid/` or `test/`, e.g. `CheXpert-v1.0-small`) and per
decoding (image size, resize mode, draft), one file of N x S x S uint8 rows:

    ROOT/<release>/<decoding.tag>/images.u8     the rows, memory-mapped by readers
    ROOT/<release>/<decoding.tag>/index.npz     per row: path, file size, mtime (ns), state
    ROOT/<release>/<decoding.tag>/builds.json   what each build decoded, reused and failed
    ROOT/<release>/<decoding.tag>/failures.json the unreadable files of the last build, by name

A row is keyed by the file's absolute path, size and mtime: a changed file rebuilds its own row
only, a new one is appended. A row holds exactly what `decoding.load(path)` returns, so a dataset
reading the store sees the very bytes it would decode from the file.

`build(paths)` decodes what is missing on every core (a process pool, a rich progress bar) and
commits the index every few seconds after the rows reach the disk, so a killed build resumes
where it stopped. A file lock serialises builders (DDP ranks, the stages of a study); readers
need no lock. `images(paths)` gives the row-aligned, picklable reader datasets take.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock

from chextrain.data.images import ImageLoadError
from chextrain.data.packed import PackedStrings
from chextrain.data.transforms import Decoding
from chextrain.errors import ChextrainError
from chextrain.fileio import atomic_write, write_json

SPLIT_DIRS: frozenset[str] = frozenset({"train", "valid", "test"})
IMAGES_FILE, INDEX_FILE, BUILDS_FILE, FAILURES_FILE = "images.u8", "index.npz", "builds.json", "failures.json"
EMPTY, READY, FAILED = 0, 1, 2  # row states
COMMIT_SECONDS = 5.0  # the index is committed at most this often during a build,
COMMIT_SHARE = 0.1  # and so that committing takes at most this share of the build's time
MAX_LISTED = 20  # unreadable files named in an error message


class StoreError(ChextrainError):
    """The store cannot give an image: unreadable files (named), or paths that were never built."""


def release_of(path: str) -> str:
    """The release folder of an image path (the folder above its split folder), else "other"."""
    parts = path.replace(os.sep, "/").split("/")
    for i in range(len(parts) - 2, 0, -1):
        if parts[i] in SPLIT_DIRS and parts[i - 1]:
            return parts[i - 1]
    return "other"


@dataclass
class BuildReport:
    """What a build did: rows decoded, rows reused as they were, and unreadable files -> reason."""

    decoded: int = 0
    reused: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def merge(self, other: BuildReport) -> None:
        """Add another part's figures to these."""
        self.decoded += other.decoded
        self.reused += other.reused
        self.failed.update(other.failed)
        self.seconds += other.seconds


class StoredImages:
    """Row-aligned reader of stored images: `images[i]` is row i's uint8 S x S (a copy).

    Holds numpy arrays only (which part file, which row), so DataLoader workers share it without
    copying; each process maps the part files itself on first use (pickling drops the maps).
    """

    def __init__(self, files: Sequence[str], size: int, part: np.ndarray, row: np.ndarray) -> None:
        self.files, self.size = list(files), size
        self.part = np.asarray(part, dtype=np.int32)
        self.row = np.asarray(row, dtype=np.int64)
        self._maps: list[np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.row)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(rows, S, S), like the array this reader stands for."""
        return (len(self.row), self.size, self.size)

    def _open(self) -> list[np.ndarray]:
        if self._maps is None:
            rows = [os.path.getsize(f) // (self.size * self.size) for f in self.files]
            self._maps = [
                np.memmap(f, dtype=np.uint8, mode="r", shape=(n, self.size, self.size))
                for f, n in zip(self.files, rows, strict=True)
            ]
        return self._maps

    def __getitem__(self, index: int) -> np.ndarray:
        return np.array(self._open()[self.part[index]][self.row[index]])

    def read_into(self, indices: Sequence[int], out: np.ndarray) -> None:
        """Copy the rows of `indices` into out (len(indices) x S x S): one copy per image."""
        maps = self._open()
        for j, i in enumerate(indices):
            out[j] = maps[self.part[i]][self.row[i]]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_maps": None}


class _Part:
    """One release's rows for one decoding: the files, the index arrays, the path -> row map."""

    def __init__(self, folder: Path, decoding: Decoding) -> None:
        self.folder, self.decoding = folder, decoding
        self.images = folder / IMAGES_FILE
        self.paths: list[str] = []
        self.size_bytes = np.zeros(0, np.int64)
        self.mtime = np.zeros(0, np.int64)
        self.state = np.zeros(0, np.int8)
        index = folder / INDEX_FILE
        if index.exists():
            with np.load(index) as z:
                self.paths = PackedStrings.from_arrays(z["path_bytes"], z["path_offsets"]).tolist()
                self.size_bytes, self.mtime, self.state = z["size"], z["mtime"], z["state"]
        self.row_of = {p: i for i, p in enumerate(self.paths)}
        self.packed: PackedStrings | None = None  # self.paths packed, kept between commits

    def rows(self, paths: Sequence[str]) -> list[int]:
        """The row of each path; new paths get new (empty) rows at the end."""
        new = [p for p in dict.fromkeys(paths) if p not in self.row_of]
        for p in new:
            self.row_of[p] = len(self.paths)
            self.paths.append(p)
        if new:
            self.packed = None
            self.size_bytes = np.concatenate([self.size_bytes, np.zeros(len(new), np.int64)])
            self.mtime = np.concatenate([self.mtime, np.zeros(len(new), np.int64)])
            self.state = np.concatenate([self.state, np.full(len(new), EMPTY, np.int8)])
        return [self.row_of[p] for p in paths]

    def grow(self) -> None:
        """Make images.u8 hold every row (new rows read as zeros until built)."""
        side = self.decoding.size
        need = len(self.paths) * side * side
        if not self.images.exists() or self.images.stat().st_size < need:
            with open(self.images, "ab") as f:
                f.truncate(need)

    def commit(self) -> None:
        """Flush the rows to disk, then write the index atomically (it never names an unwritten row)."""
        if self.images.exists():
            with open(self.images, "rb+") as f:
                os.fdatasync(f.fileno())
        if self.packed is None:
            self.packed = PackedStrings(self.paths)
        packed = self.packed
        arrays = {
            "path_bytes": packed.buffer,
            "path_offsets": packed.offsets,
            "size": self.size_bytes,
            "mtime": self.mtime,
            "state": self.state,
        }
        atomic_write(self.folder / INDEX_FILE, lambda tmp: _savez(tmp, arrays))


def _savez(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as f:  # a file object: np.savez would append ".npz" to a bare name
        np.savez(f, **arrays)


def _decode_rows(
    images: str, decoding: Decoding, jobs: list[tuple[int, str]]
) -> list[tuple[int, str | None]]:
    """Decode each (row, path) into its row of `images` (pwrite); (row, None or the reason it failed)."""
    out: list[tuple[int, str | None]] = []
    side = decoding.size
    fd = os.open(images, os.O_WRONLY)
    try:
        for row, path in jobs:
            try:
                pixels = decoding.load(path)
            except ImageLoadError as err:
                out.append((row, err.reason))
                continue
            os.pwrite(fd, np.ascontiguousarray(pixels, dtype=np.uint8).tobytes(), row * side * side)
            out.append((row, None))
    finally:
        os.close(fd)
    return out


def _stat(path: str) -> tuple[int, int] | None:
    """(size in bytes, mtime in ns) of a file, or None when it cannot be read."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return int(st.st_size), int(st.st_mtime_ns)


class ImageStore:
    """Prepared images under `root` for one decoding (see the module docstring).

    Args:
        root: the store's folder (created when missing); shared by every stage that uses it.
        decoding: image size, resize mode and draft decoding of the rows.
        workers: build processes (None: every core this process may use; 1: in this process).
        progress: show a progress bar while building.
    """

    def __init__(
        self, root: str | Path, decoding: Decoding, *, workers: int | None = None, progress: bool = True
    ) -> None:
        self.root, self.decoding, self.progress = Path(root), decoding, progress
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        self.workers = max(1, cpus if workers is None else workers)

    def folder(self, release: str) -> Path:
        """Where a release's rows for this decoding live."""
        return self.root / release / self.decoding.tag

    def build(self, paths: Iterable[str]) -> BuildReport:
        """Decode every image of `paths` that has no up-to-date row; report what was done."""
        by_release: dict[str, list[str]] = {}
        for path in dict.fromkeys(str(p) for p in paths):
            by_release.setdefault(release_of(path), []).append(path)
        report = BuildReport()
        for release, members in sorted(by_release.items()):
            report.merge(self._build_part(release, members))
        return report

    def images(self, paths: Sequence[str]) -> StoredImages:
        """The reader of `paths`' rows, in order (built beforehand with `build`).

        Raises:
            StoreError: naming the paths that have no ready row (never built, or unreadable).
        """
        paths = [str(p) for p in paths]
        releases = sorted({release_of(p) for p in paths})
        files, parts = [], {}
        for k, release in enumerate(releases):
            part = _Part(self.folder(release), self.decoding)
            parts[release] = (k, part)
            files.append(str(part.images))
        which = np.empty(len(paths), np.int32)
        rows = np.empty(len(paths), np.int64)
        missing = []
        for i, path in enumerate(paths):
            k, part = parts[release_of(path)]
            row = part.row_of.get(path)
            if row is None or part.state[row] != READY:
                missing.append(path)
                continue
            which[i], rows[i] = k, row
        if missing:
            raise StoreError(
                f"{len(missing)} image(s) have no row in the store {self.root} ({self.decoding.tag}): "
                + _listing(missing)
            )
        return StoredImages(files, self.decoding.size, which, rows)

    def prepare(self, paths: Sequence[str]) -> StoredImages:
        """`build(paths)` then `images(paths)`; unreadable files stop it, each named with its reason."""
        paths = [str(p) for p in paths]
        report = self.build(paths)
        if report.failed:
            named = [f"{p} ({r})" for p, r in sorted(report.failed.items())]
            raise StoreError(f"{len(named)} image(s) cannot be read: " + _listing(named))
        return self.images(paths)

    def _build_part(self, release: str, paths: list[str]) -> BuildReport:
        folder = self.folder(release)
        folder.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        with FileLock(str(folder / ".lock")):
            part = _Part(folder, self.decoding)
            report, todo = BuildReport(), []
            old_failures = self._failures(folder)
            for path, row in zip(paths, part.rows(paths), strict=True):
                key = _stat(path)
                if key is None:
                    part.state[row] = FAILED
                    report.failed[path] = "file not found or not readable"
                    continue
                same = (int(part.size_bytes[row]), int(part.mtime[row])) == key
                if same and part.state[row] == READY:
                    report.reused += 1
                elif same and part.state[row] == FAILED:
                    report.failed[path] = old_failures.get(path, "unreadable in an earlier build")
                else:
                    part.size_bytes[row], part.mtime[row] = key
                    part.state[row] = EMPTY
                    todo.append((row, path))
            part.grow()
            if todo:
                self._decode(part, todo, report, release)
            part.commit()
            report.seconds = time.time() - t0
            failures = {
                p: r
                for p, r in old_failures.items()
                if p in part.row_of and part.state[part.row_of[p]] == FAILED
            }
            self._log(folder, report, failures | report.failed)
        return report

    def _decode(self, part: _Part, todo: list[tuple[int, str]], report: BuildReport, release: str) -> None:
        """Decode `todo` into the part's rows on self.workers processes, committing as rows land."""
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        step = max(1, min(64, math.ceil(len(todo) / (4 * self.workers))))
        chunks = [todo[i : i + step] for i in range(0, len(todo), step)]
        label = f"store {release} {self.decoding.tag}"
        columns = (TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        last, cost = time.monotonic(), 0.0

        def land(results: list[tuple[int, str | None]], bar: Any, task: Any) -> None:
            nonlocal last, cost
            for row, reason in results:
                part.state[row] = READY if reason is None else FAILED
                if reason is None:
                    report.decoded += 1
                else:
                    report.failed[part.paths[row]] = reason
            bar.advance(task, len(results))
            if time.monotonic() - last > max(COMMIT_SECONDS, cost / COMMIT_SHARE):
                start = time.monotonic()
                part.commit()
                last = time.monotonic()
                cost = last - start

        with Progress(*columns, disable=not self.progress) as bar:
            task = bar.add_task("decode", total=len(todo))
            if self.workers == 1 or len(chunks) == 1:
                for chunk in chunks:
                    land(_decode_rows(str(part.images), self.decoding, chunk), bar, task)
                return
            with ProcessPoolExecutor(min(self.workers, len(chunks))) as pool:
                futures = [pool.submit(_decode_rows, str(part.images), self.decoding, c) for c in chunks]
                for future in as_completed(futures):
                    land(future.result(), bar, task)

    @staticmethod
    def _failures(folder: Path) -> dict[str, str]:
        """Unreadable files of earlier builds -> reason (failures.json)."""
        try:
            found = json.loads((folder / FAILURES_FILE).read_text())
        except (OSError, ValueError):
            return {}
        return {str(k): str(v) for k, v in found.items()} if isinstance(found, dict) else {}

    @staticmethod
    def _log(folder: Path, report: BuildReport, failures: dict[str, str]) -> None:
        """Append the build to builds.json; failures.json: every unreadable file -> reason."""
        log = folder / BUILDS_FILE
        try:
            builds = json.loads(log.read_text()) if log.exists() else []
        except ValueError:
            builds = []
        entry = {"decoded": report.decoded, "reused": report.reused, "failed": len(report.failed)}
        builds.append(
            {**entry, "seconds": round(report.seconds, 3), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        )
        write_json(log, builds, newline=True)
        write_json(folder / FAILURES_FILE, failures, newline=True)


def _listing(items: Sequence[str]) -> str:
    shown = "; ".join(items[:MAX_LISTED])
    return shown + (f"; and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else "")


def disk_bytes(images: int, size: int) -> int:
    """Bytes of store rows for `images` images at `size` px (the index adds about 100 B per image)."""
    return images * size * size
