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

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import typer

from chextrain.cli import print_error

BUNDLE_META, BUNDLE_WEIGHTS = "model.json", "model.safetensors"  # models.bundle.META_FILE, WEIGHTS_FILE


class ArgumentError(ValueError):
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
