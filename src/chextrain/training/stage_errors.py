"""How a stage's errors read: validation errors as one `field: problem` line each, naming the file or
override, and the error that stops a stage whose loss or probabilities stop being finite.

Used by training/stage.py (parse_stage, check_overrides) and the objectives; pydantic only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel

from chextrain.errors import FAILED_RUN, ChextrainError


class NonFiniteError(ChextrainError):
    """A training loss or validation probability that is NaN or infinite: the stage stops at once.

    The message names the stage, the step and a hint (the learning rate, an input file, the init
    weights); the stage is left unfinished (no bundle, no done.json).
    """

    exit_code = FAILED_RUN


def non_finite_message(stage: str, what: str, where: str, hint: str) -> str:
    """`stage 'NAME': WHAT WHERE; HINT. The stage stopped unfinished (no bundle, no done.json) ...`.

    where: e.g. `at training step 12 (epoch 0)`, `at the validation after step 12`.
    """
    return (
        f"stage {stage!r}: {what} {where}; {hint}. The stage stopped unfinished "
        "(no bundle, no done.json); fix the cause and run it again"
    )


def related(loc: tuple[Any, ...], path: tuple[str, ...]) -> bool:
    """An error location at, above or below an override's key path (not a cross-field check)."""
    n = min(len(loc), len(path))
    return n > 0 and tuple(str(p) for p in loc[:n]) == path[:n]


def format_errors(
    errors: Sequence[Any],
    source: str,
    data: Mapping[str, Any],
    types: Mapping[str, type[BaseModel]],
    validated: type[BaseModel] | None = None,
    overrides: Sequence[str] = (),
) -> str:
    """`source: N invalid field(s):` then one `  field: problem` line per pydantic error.

    `types`: the stage type of each objective (the first is the default); `validated`: the type
    validated directly (its errors carry no union tag); a problem at the key of one of `overrides`
    says so (`(from --set KEY=VALUE)`), and when every problem comes from overrides they are
    named instead of `source` (the file itself is fine).
    """
    paths = {item: tuple(item.partition("=")[0].strip().split(".")) for item in overrides}
    lines: list[str] = []
    blamed: list[str | None] = []  # per line: the override it comes from
    for e in errors:
        parts = tuple(e["loc"])
        model: Any = validated or next(iter(types.values()))
        tag = next(n for n, m in types.items() if m is model)
        if validated is None and parts and parts[0] in types:  # the union's tag: the type validated
            tag, parts = str(parts[0]), parts[1:]
            model = types[tag]
        loc = ".".join(str(p) for p in parts) or "(top level)"
        if e["type"] == "objective":
            msg = f"{e['msg']} (got {data.get('objective')!r})"
            loc = "objective"
        elif e["type"] == "extra_forbidden":
            msg = f"unknown key; allowed keys: {', '.join(allowed_keys(model, parts[:-1]))}"
            if len(parts) == 1 and any(str(parts[0]) in t.model_fields for t in types.values()):
                users = [n for n, t in types.items() if str(parts[0]) in t.model_fields]
                msg = f"does not apply to an `objective: {tag}` stage (only to {', '.join(users)}); {msg}"
        elif e["type"] == "missing":
            msg = "required key is missing"
        elif not parts and e["type"] == "value_error":  # cross-field checks: one "field: problem" a line
            found = [f"  {line}" for line in e["msg"].removeprefix("Value error, ").splitlines()]
            lines += found
            blamed += [None] * len(found)
            continue
        else:
            msg = e["msg"].removeprefix("Value error, ")
            if "input" in e and not isinstance(e["input"], Mapping):
                msg += f" (got {e['input']!r})"
        culprit = next((item for item, path in paths.items() if parts and related(parts, path)), None)
        lines.append(f"  {loc}: {msg}" + (f" (from --set {culprit})" if culprit else ""))
        blamed.append(culprit)
    if blamed and all(blamed):
        source = ", ".join(f"--set {item}" for item in dict.fromkeys(b for b in blamed if b))
    return f"{source}: {len(lines)} invalid field(s):\n" + "\n".join(lines)


def allowed_keys(model: Any, loc: Sequence[Any]) -> list[str]:
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        annotation = getattr(field, "annotation", None)
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if model is None:
            return []
    keys = list(model.model_fields)
    if "objective" in keys:  # read first: it decides which other keys apply
        keys.remove("objective")
        keys.insert(keys.index("label") + 1, "objective")
    return keys
