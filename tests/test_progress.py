"""training/progress.py: what a stage prints is its own lines, not the libraries' noise."""

from __future__ import annotations

import logging
import warnings

from lightning.pytorch.utilities._pytree import _tree_flatten

from chextrain.training.progress import LIGHTNING_INFO_LOGGERS, frozen_batchnorms_quiet, lightning_info_quiet


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


def _lightnings_eval_mode_warning(module) -> list[str]:
    """What Lightning's fit loop warns at the start of training for `module` (its own code)."""
    from types import SimpleNamespace

    from lightning.pytorch.loops.fit_loop import _FitLoop

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with frozen_batchnorms_quiet(module):
            _FitLoop._warn_if_modules_in_eval_mode(
                SimpleNamespace(trainer=SimpleNamespace(lightning_module=module))
            )
    return [str(w.message) for w in caught]


def test_frozen_batchnorms_in_eval_mode_are_not_reported_but_other_eval_modules_are() -> None:
    from chextrain.models.net import CXRNet, apply_freeze

    net = CXRNet("tiny")
    assert _lightnings_eval_mode_warning(net) == []  # all in train mode: Lightning says nothing
    apply_freeze(net, "encoder", ["shared"])  # the encoder's BatchNorm layers now run in eval mode
    assert _lightnings_eval_mode_warning(net) == []  # on purpose: hidden
    net.heads["shared"].eval()  # a module left in eval mode by mistake
    (message,) = _lightnings_eval_mode_warning(net)
    assert "module(s) in eval mode at the start of training" in message
