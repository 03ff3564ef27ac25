"""The `chextrain` command line: a Typer app whose commands live in the modules of this package.

Each module in COMMAND_MODULES exposes `register(app: typer.Typer) -> None`, which adds its
commands (or a sub-app such as `data`). Commands stay thin: check the arguments (cli/checks.py),
import the library code that does the work, call it, print. At module level a command module
imports typer, rich and the standard library only (tests/test_imports.py), so building the app for
`chextrain --help` or a mistyped argument costs no torch, pandas or Lightning import.
"""

from __future__ import annotations

import importlib

import typer

COMMAND_MODULES: tuple[str, ...] = (
    "data",
    "train",
    "study",
    "demo",
    "use",
    "photo",
    "probe",
)


def print_error(message: object) -> None:
    """An error line on stderr: never re-wrapped, and never read as rich markup."""
    from rich.console import Console
    from rich.markup import escape

    Console(stderr=True, soft_wrap=True).print(f"[red]error:[/red] {escape(str(message))}", highlight=False)


def build_app() -> typer.Typer:
    """Build the Typer app with every command module registered."""
    app = typer.Typer(
        name="chextrain",
        help="Train, evaluate, explain and serve chest x-ray classifiers for x-rays and photos of them.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        rich_markup_mode=None,  # click's plain help: no rich/markdown renderer to import for --help
    )
    for name in COMMAND_MODULES:
        importlib.import_module(f"chextrain.cli.{name}").register(app)
    return app


def main() -> None:
    """Console-script entry point."""
    build_app()()


if __name__ == "__main__":
    main()
