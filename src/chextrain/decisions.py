"""What a scored image may claim: each head's calibrated probabilities and thresholds, and the
findings withheld when the image is flagged.

`bundle_temperatures` reads a bundle's temperature per head (model.json `temperature`, fitted on
validation by evaluation.calibration); `scale_thresholds` maps the thresholds (tuned on raw
probabilities) through them, so a calibrated probability crosses its threshold exactly when the
raw one did. `withhold` moves a flagged result's findings out of its "pathologies" (OOD, an unsure
router, a photo that fails the quality gate) unless the caller asks to score it anyway.
`inference.Predictor` applies all three; `PredictorError` is the error of both modules.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from chextrain.errors import ChextrainError
from chextrain.evaluation.calibration import CalibrationError, apply_temperature, check_temperature


class PredictorError(ChextrainError):
    """A bundle, option or calibration that cannot be used as asked; the message says which."""


def bundle_temperatures(meta: Mapping[str, Any], heads: Sequence[str], name: str = "") -> dict[str, float]:
    """model.json's {head: temperature} checked against the model's heads ({} when absent: T = 1)."""
    found = meta.get("temperature") or {}
    where = f"bundle {name} " if name else "bundle "
    if not isinstance(found, Mapping):
        raise PredictorError(f"{where}temperature: expected {{head: number > 0}}, got {found!r}")
    unknown = sorted(set(found) - set(heads))
    if unknown:
        raise PredictorError(f"{where}temperature names heads {unknown}; the model has heads {list(heads)}")
    try:
        return {str(h): check_temperature(t, f"{where}temperature[{h!r}]") for h, t in found.items()}
    except CalibrationError as err:
        raise PredictorError(str(err)) from None


def scale_thresholds(
    thresholds: Mapping[str, Mapping[str, float]], temperature: Mapping[str, float]
) -> dict[str, dict[str, float]]:
    """Thresholds (tuned on raw probabilities) mapped through each head's temperature, so that a
    calibrated probability crosses its threshold exactly when the raw one did (T is monotone)."""
    out = {h: dict(per) for h, per in thresholds.items()}
    for head, t in temperature.items():
        if head in out:
            out[head] = {s: float(apply_temperature(np.float64(v), t)) for s, v in out[head].items()}
    return out


# --- withholding ---------------------------------------------------------------------------


def withheld_reasons(result: Mapping[str, Any]) -> list[str]:
    """Why a result's findings cannot be trusted, in short words (empty: nothing to withhold).

    Reads the result's OOD flag, its unsure router and, when present, its quality report.
    """
    reasons = []
    if result["ood"].get("flag"):
        reasons.append("out-of-distribution")
    if result["router_uncertain"]:
        reasons.append("router unsure (digital x-ray or photo?)")
    quality = result.get("quality")
    if quality and not quality["passed"]:
        failed = [name for name, check in quality["checks"].items() if check["verdict"] == "fail"]
        reasons.append("poor photo: " + ", ".join(failed))
    return reasons


def withhold(result: dict[str, Any], *, score_anyway: bool = False) -> dict[str, Any]:
    """`result` with its findings withheld when it is flagged, unless `score_anyway`.

    Adds `withheld` (bool), `withheld_reason` (str or None) and `scored_anyway` (flagged, but
    scored because the caller asked). Withheld: "pathologies" becomes "withheld_pathologies", so
    no reader can take a withheld probability for a finding by accident.
    """
    reasons = withheld_reasons(result)
    withheld = bool(reasons) and not score_anyway
    result["withheld"] = withheld
    result["withheld_reason"] = "; ".join(reasons) if withheld else None
    result["scored_anyway"] = bool(reasons) and score_anyway
    if withheld:
        result["withheld_pathologies"] = result.pop("pathologies")
    return result
