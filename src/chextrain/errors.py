"""The one base class of every error chextrain raises on purpose.

Every project exception (CatalogError, StageError, WeightsError, ...) derives from
`ChextrainError`, so the command line catches them at one place (cli/__init__.py) and prints one
line naming the culprit instead of a traceback. It is a ValueError: the errors are about values
(a file, a field, a line) that cannot be used as given, and callers that catch ValueError keep
working. This module imports nothing, so any module can import it.
"""

from __future__ import annotations

from typing import ClassVar

BAD_INPUT, FAILED_RUN = 2, 1  # the command line's exit codes


class ChextrainError(ValueError):
    """An input or state chextrain cannot use; the message names the file, field or line and what
    was expected.

    `exit_code` is what the command line exits with: 2 for bad input (the default), 1 for a run
    that was started and failed.
    """

    exit_code: ClassVar[int] = BAD_INPUT
