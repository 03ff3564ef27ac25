"""training/progress.py: what a stage prints is its own lines, not the libraries' noise."""

from __future__ import annotations

import logging
import warnings

from lightning.pytorch.utilities._pytree import _tree_flatten

from chextrain.training.progress import LIGHTNING_INFO_LOGGERS, lightning_info_quiet


def _warnings_of_a_fit_step() -> list[str]:
    """What Lightning's pytree code (run at every fit's batches) warns, all warnings shown."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _tree_flatten({"loss": 1.0})
    return [str(w.message) for w in caught]


def test_torchs_leafspec_warning_is_hidden_during_a_stage_only() -> None:
    outside = _warnings_of_a_fit_step()
    with lightning_info_quiet(), warnings.catch_warnings(record=True) as caught:
        _tree_flatten({"loss": 1.0})  # under the stage's filters
        warnings.warn("a warning of the user's own", UserWarning, stacklevel=1)
    inside = [str(w.message) for w in caught]
    assert any("LeafSpec" in m for m in outside)  # torch still warns: the filter has work to do
    assert inside == ["a warning of the user's own"]  # that one only
    assert any("LeafSpec" in m for m in _warnings_of_a_fit_step())  # the filters are restored after


def test_lightning_info_loggers_are_restored() -> None:
    levels = [logging.getLogger(n).level for n in LIGHTNING_INFO_LOGGERS]
    with lightning_info_quiet():
        assert all(logging.getLogger(n).level == logging.WARNING for n in LIGHTNING_INFO_LOGGERS)
    assert [logging.getLogger(n).level for n in LIGHTNING_INFO_LOGGERS] == levels
