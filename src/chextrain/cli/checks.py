"""Checks of command-line arguments that run before a command imports anything heavy.

A typo on the command line should cost a fraction of a second, not a torch import: each command
first checks its paths, choices and `--set` overrides here, then imports what does the work. The
messages are the library's own for the same mistake (models.bundle.load_bundle,
training.stage.read_yaml / apply_overrides, data.catalog.find_releases, ...), so the output does
not depend on which side noticed; tests/test_cli_use.py compares the two.

Every check raises `ArgumentError`; `reported()` prints it as the one error line and exits.
This module imports the standard library and typer only (yaml when an override is checked).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import typer

from chextrain.cli import print_error
from chextrain.errors import ChextrainError

BUNDLE_META, BUNDLE_WEIGHTS = "model.json", "model.safetensors"  # models.bundle.META_FILE, WEIGHTS_FILE


class ArgumentError(ChextrainError):
    """A command-line argument that cannot work; the message names it and what was expected."""


@contextmanager
def reported(code: int = 2, show: Callable[[object], None] = print_error) -> Iterator[None]:
    """Turn an ArgumentError raised inside into `show(message)` and exit code `code`."""
    try:
        yield
    except ArgumentError as err:
        show(err)
        raise typer.Exit(code) from None


def choice(value: str, choices: Sequence[str], what: str) -> None:
    """`value` must be one of `choices`; `what` names the argument (e.g. "--format", "domain")."""
    if value not in choices:
        raise ArgumentError(f"{what} {value!r} is not one of {list(choices)}")


def bundle(path: Path) -> None:
    """A bundle's folder, its model.json and its model.safetensors exist (load_bundle's first checks)."""
    path = Path(path)
    meta = path / BUNDLE_META if path.is_dir() else path.parent / BUNDLE_META
    if not path.exists():
        raise ArgumentError(f"bundle path {path} does not exist")
    if not meta.is_file():
        raise ArgumentError(f"bundle file {meta} is missing")
    if not (meta.parent / BUNDLE_WEIGHTS).is_file():
        raise ArgumentError(f"bundle file {meta.parent / BUNDLE_WEIGHTS} is missing (next to {meta})")


def readable(path: Path, what: str) -> None:
    """The `what` file (stage, study) can be opened for reading."""
    try:
        with open(path, "rb"):
            pass
    except OSError as err:
        raise ArgumentError(f"cannot read {what} file {path}: {err.strerror}") from None


def data_root(path: Path) -> None:
    """A data root is a folder (the releases are looked for inside it)."""
    if not Path(path).is_dir():
        raise ArgumentError(f"{path}: data root is not a directory")


def overrides(items: Sequence[str]) -> None:
    """Each `--set` item is `key.sub=value` with a value that parses as YAML."""
    import yaml

    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ArgumentError(f"override {item!r}: expected key.sub=value")
        try:
            yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ArgumentError(f"override {item!r}: value is not valid YAML ({err})") from None


def file_exists(path: Path, message: str) -> None:
    """`path` is a file; `message` says what its absence means."""
    if not Path(path).is_file():
        raise ArgumentError(message)


def _blocker(path: Path) -> Path | None:
    """The nearest existing ancestor of `path` (itself included) when it is not a folder, else None."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return None if candidate.is_dir() else candidate
    return None


def out_dir(path: Path, what: str = "--out") -> None:
    """An output folder can be created (or is a folder): nothing on its way is a regular file."""
    path = Path(path)
    blocker = _blocker(path)
    if blocker is not None:
        raise ArgumentError(f"{what} {path}: {blocker} is a file, not a folder")
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is not None and not os.access(existing, os.W_OK):
        raise ArgumentError(f"{what} {path}: cannot write in {existing} (permission denied)")


def out_file(path: Path, what: str = "--out") -> None:
    """An output file can be written: it is not a folder and its folder can be created."""
    path = Path(path)
    if path.is_dir():
        raise ArgumentError(f"{what} {path} is a folder; expected a file name")
    blocker = _blocker(path.parent)
    if blocker is not None:
        raise ArgumentError(f"{what} {path}: {blocker} is a file, not a folder")


def json_file(path: Path, what: str) -> None:
    """`path` holds a JSON document (e.g. a study folder's study.json)."""
    import json

    try:
        json.loads(Path(path).read_bytes().decode("utf-8"))
    except OSError as err:
        raise ArgumentError(f"cannot read {what} {path}: {err.strerror or err}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ArgumentError(f"{what} {path} is not valid JSON ({err})") from None


def port_free(host: str, port: int) -> None:
    """Nothing listens on host:port yet (so `serve` can say where it serves only once it can)."""
    import socket

    if not 0 <= port <= 65535:
        raise ArgumentError(f"--port {port}: expected 0 to 65535")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as err:
        raise ArgumentError(f"--host {host}: cannot resolve it ({err.strerror or err})") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(address)
        except OSError as err:
            reason = "in use" if err.errno in (48, 98, 10048) else (err.strerror or str(err))
            raise ArgumentError(f"--port {port} on {host}: {reason}") from None
