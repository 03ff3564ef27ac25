"""The `chextrain` command line: a Typer app whose commands live in the modules of this package.

Each module in COMMAND_MODULES exposes `register(app: typer.Typer) -> None`, which adds its
commands (or a sub-app such as `data`). Commands stay thin: check the arguments (cli/checks.py),
import the library code that does the work, call it, print. At module level a command module
imports typer, rich and the standard library only (tests/test_imports.py), so building the app for
`chextrain --help` or a mistyped argument costs no torch, pandas or Lightning import.

One error boundary (`ErrorBoundary`, the app's top group) catches what any command raises: a
chextrain error (chextrain.errors.ChextrainError) or an OS error about a file or a port is one
line on stderr naming the culprit, exit code 2 (bad input; a ChextrainError may say 1, a failed
run); any other error (a full disk, a training error) is one line with its type, exit code 1.
Ctrl-C is one line too, exit code 130, wherever it lands (also where a library wraps it, as
pydantic's serializer does). `--debug` or CHEXTRAIN_DEBUG=1 lets the exception through with its
traceback.
"""

from __future__ import annotations

import errno
import importlib
import os
from typing import Any

import typer
from typer.core import TyperGroup
from typer.exceptions import TyperException

from chextrain.errors import BAD_INPUT, FAILED_RUN, ChextrainError

COMMAND_MODULES: tuple[str, ...] = (
    "data",
    "train",
    "study",
    "demo",
    "use",
    "deploy",
    "info",
    "photo",
    "probe",
    "convert",
)
DEBUG_ENV = "CHEXTRAIN_DEBUG"
INTERRUPTED = 130  # the shell's code for a process ended by SIGINT (128 + 2)
# OS errors about the paths or ports given (exit 2); any other (a full disk, I/O) is a failed run
BAD_PATH_ERRNOS = frozenset(
    {
        errno.ENOENT,
        errno.ENOTDIR,
        errno.EISDIR,
        errno.EACCES,
        errno.EPERM,
        errno.EEXIST,
        errno.ENAMETOOLONG,
        errno.EADDRINUSE,
        errno.EADDRNOTAVAIL,
    }
)


def print_error(message: object) -> None:
    """An error line on stderr: never re-wrapped, and never read as rich markup."""
    from rich.console import Console
    from rich.markup import escape

    Console(stderr=True, soft_wrap=True).print(f"[red]error:[/red] {escape(str(message))}", highlight=False)


def describe_error(err: BaseException) -> tuple[int, str]:
    """(exit code, one line) for an exception that reached the command line."""
    if isinstance(err, ChextrainError):
        return err.exit_code, str(err)
    if isinstance(err, OSError):
        where = " -> ".join(str(f) for f in (err.filename, err.filename2) if f is not None)
        reason = err.strerror or str(err)
        code = BAD_INPUT if err.errno in BAD_PATH_ERRNOS else FAILED_RUN  # a full disk is no bad input
        return code, f"{where}: {reason}" if where else reason
    text = str(err).strip().splitlines()
    first = text[0] if text else ""
    return FAILED_RUN, (
        f"{type(err).__name__}: {first} (run with --debug or {DEBUG_ENV}=1 for the traceback)"
    )


def interrupted(err: BaseException) -> bool:
    """Whether `err` is a Ctrl-C: a KeyboardInterrupt, one in its chain, or one a library wrapped.

    pydantic's serializer turns a KeyboardInterrupt raised in a model's own serializer (where
    Ctrl-C lands while a study is read and hashed) into a PydanticSerializationError that only
    names it in its message.
    """
    seen: set[int] = set()
    link: BaseException | None = err
    while link is not None and id(link) not in seen:
        if isinstance(link, KeyboardInterrupt):
            return True
        if type(link).__name__ == "PydanticSerializationError" and "KeyboardInterrupt" in str(link):
            return True
        seen.add(id(link))
        link = link.__cause__ or link.__context__
    return False


def debugging(ctx: Any) -> bool:
    """--debug on the command line or CHEXTRAIN_DEBUG set to anything but '' or '0'."""
    root = ctx.find_root()
    return bool(root.params.get("debug")) or os.environ.get(DEBUG_ENV, "") not in ("", "0")


class ErrorBoundary(TyperGroup):
    """The app's top group: every exception a command raises ends here as one error line."""

    def invoke(self, ctx: Any) -> Any:
        """Run the command; print one line and exit 2 (bad input) or 1 (failed run) on an error,
        130 on Ctrl-C."""
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, TyperException):  # typer's own: --help, usage errors, exits
            raise
        except (Exception, KeyboardInterrupt) as err:
            if debugging(ctx):
                raise
            if interrupted(err):
                print_error("interrupted (Ctrl-C)")
                raise typer.Exit(INTERRUPTED) from None
            code, line = describe_error(err)
            print_error(line)
            raise typer.Exit(code) from None


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"chextrain {version('chextrain')}")
        except PackageNotFoundError:
            typer.echo("chextrain (not installed)")
        raise typer.Exit()


def _options(
    debug: bool = typer.Option(
        False, "--debug", help=f"Show the traceback of an error (or set {DEBUG_ENV}=1)."
    ),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Train, evaluate, explain and serve chest x-ray classifiers for x-rays and photos of them."""


def build_app() -> typer.Typer:
    """Build the Typer app with every command module registered."""
    app = typer.Typer(
        name="chextrain",
        help="Train, evaluate, explain and serve chest x-ray classifiers for x-rays and photos of them.",
        cls=ErrorBoundary,
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        rich_markup_mode=None,  # click's plain help: no rich/markdown renderer to import for --help
    )
    app.callback()(_options)
    for name in COMMAND_MODULES:
        importlib.import_module(f"chextrain.cli.{name}").register(app)
    return app


def main() -> None:
    """Console-script entry point."""
    build_app()()


if __name__ == "__main__":
    main()
