"""Every paper strategy as a tiny stage on the demo tree, run through train_stage.

One chain of stages per module (tiny backbone, 32 px, 3 steps each) shared by the tests:
baseline -> fine-tune (whole model, 1e-5) and fine-tune (last block); mixed; mixed with two heads
-> one head retrained on a frozen encoder, and a router trained on top; mixed -> new heads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from sklearn.metrics import matthews_corrcoef, roc_auc_score

from chextrain.data.catalog import read_catalog
from chextrain.evaluation.metrics import tune_thresholds
from chextrain.evaluation.predict import arrays, tune_head_thresholds
from chextrain.labels import SLUGS
from chextrain.training.lifecycle import RunDirError, StageResult, train_stage
from chextrain.training.stage import Stage, StageError, load_stage, parse_stage, resolved_config

MIXED = {"train": ["chexpert", "chexphoto"]}
TWO_HEADS = {
    "heads": ["chexpert", "chexphoto"],
    "domain_heads": {"digital": "chexpert", "photo": "chexphoto"},
}


def tiny(name: str, **keys: Any) -> Stage:
    base = {
        "name": name,
        "backbone": "tiny",
        "init": "random",
        "image_size": 32,
        "batch_size": 8,
        "max_steps": 3,
        "split": {"val_fraction": 0.25},
        "num_workers": 0,
        "checkpoint_every_n_steps": 100,
        "val_every_n_steps": 3,
    }
    return parse_stage({**base, **keys})


@pytest.fixture(scope="module")
def catalog(demo_root: Path) -> pd.DataFrame:
    return read_catalog(demo_root)


@pytest.fixture(scope="module")
def runs(
    demo_root: Path, catalog: pd.DataFrame, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, StageResult]:
    out = tmp_path_factory.mktemp("runs")
    results: dict[str, StageResult] = {}

    def run(stage: Stage) -> None:
        results[stage.name] = train_stage(
            stage,
            demo_root,
            out / stage.name,
            catalog=catalog,
            progress=False,
            resolve_ref=lambda name: out / name,
        )

    run(tiny("baseline", optimizer={"lr": 1e-3}))
    run(tiny("finetune", init="stage:baseline", data={"train": ["chexphoto"]}, optimizer={"lr": 1e-5}))
    run(
        tiny(
            "finetune_last_block",
            init="stage:baseline",
            data={"train": ["chexphoto"]},
            optimizer={"lr": 1e-5},
            freeze="last-block",
        )
    )
    run(tiny("mixed", data=MIXED, augment={"photo_sim": {"p": 0.5, "recipe": "digital"}}))
    run(tiny("two_heads", data=MIXED, train_heads=["chexpert", "chexphoto"], **TWO_HEADS))
    run(
        tiny(
            "chexpert_head",
            init="stage:two_heads",
            train_heads=["chexpert"],
            freeze="encoder",
            optimizer={"lr": 1e-2},
            **TWO_HEADS,
        )
    )
    run(
        tiny(
            "router",
            init="stage:two_heads",
            data=MIXED,
            router=True,
            train_heads=["router"],
            freeze="encoder",
            optimizer={"lr": 1e-2},
            **TWO_HEADS,
        )
    )
    run(tiny("new_heads", init="stage:mixed", train_heads=["chexpert"], freeze="encoder", **TWO_HEADS))
    run(tiny("budget", data={**MIXED, "budget": {"total": 40, "digital": 20}}, evaluate=["test"]))
    return results


def weights(result: StageResult) -> dict[str, torch.Tensor]:
    return load_file(result.out_dir / "model.safetensors")


def done(result: StageResult) -> dict[str, Any]:
    return json.loads((result.out_dir / "done.json").read_text())


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], prefix: str) -> bool:
    keys = [k for k in a if k.startswith(prefix)]
    assert keys, prefix
    return all(torch.equal(a[k], b[k]) for k in keys)


def test_baseline_writes_every_output(runs: dict[str, StageResult]) -> None:
    r = runs["baseline"]
    for name in (
        "model.safetensors",
        "model.json",
        "config.yaml",
        "done.json",
        "checkpoints/last.ckpt",
        "README.md",
        "predictions_val.parquet",
        "predictions_test.parquet",
        "metrics_val.json",
        "metrics_test.json",
        "logs/csv/metrics.csv",
    ):
        assert (r.out_dir / name).exists(), name
    assert list((r.out_dir / "logs" / "tensorboard").glob("events.out.tfevents.*"))
    # keep_checkpoints: last (the default): a finished stage keeps its bundle and last.ckpt only
    assert [p.name for p in (r.out_dir / "checkpoints").iterdir()] == ["last.ckpt"]
    assert load_stage(r.out_dir / "config.yaml") == tiny("baseline", optimizer={"lr": 1e-3})
    record = done(r)
    assert record["global_step"] == 3 and record["samples_seen_per_rank"] == [24] and record["lr"] == [1e-3]
    meta = json.loads((r.out_dir / "model.json").read_text())
    assert meta["stage"] == "baseline" and meta["image_size"] == 32
    assert meta["preprocessing"]["name"] == "imagenet"
    assert meta["config"] == resolved_config(tiny("baseline", optimizer={"lr": 1e-3}))
    assert set(r.metrics) >= {"val/Standard", "test/Standard", "test/Photos", "test/kind:natural"}
    assert "val/auc_mean" in (r.out_dir / "logs/csv/metrics.csv").read_text()
    # OOD calibration on the validation images travels with the bundle.
    assert meta["ood"]["n"] == len(pd.read_parquet(r.out_dir / "predictions_val.parquet"))
    assert meta["ood"]["threshold"] > 0 and "router" not in meta


def test_finished_stage_is_not_redone(
    runs: dict[str, StageResult], demo_root: Path, catalog: pd.DataFrame
) -> None:
    r = runs["baseline"]
    before = (r.out_dir / "model.safetensors").stat().st_mtime_ns
    again = train_stage(
        tiny("baseline", optimizer={"lr": 1e-3}), demo_root, r.out_dir, catalog=catalog, progress=False
    )
    assert again.cached and (r.out_dir / "model.safetensors").stat().st_mtime_ns == before
    assert again.metrics["test/Standard"]["average"] == pytest.approx(r.metrics["test/Standard"]["average"])
    with pytest.raises(RunDirError, match="another configuration"):
        train_stage(tiny("baseline", seed=1), demo_root, r.out_dir, catalog=catalog, progress=False)


def test_finetune_uses_its_own_lr_not_the_inherited_one(runs: dict[str, StageResult]) -> None:
    base, ft = weights(runs["baseline"]), weights(runs["finetune"])
    assert done(runs["finetune"])["lr"] == [1e-5] and done(runs["baseline"])["lr"] == [1e-3]
    # Adam moves each weight by about lr per step: 3 steps at 1e-5, not at the baseline's 1e-3.
    deltas = [float((ft[k] - base[k]).abs().max()) for k in base if k.endswith("weight") and "heads" in k]
    assert 0 < max(deltas) < 5e-5
    assert not same(base, ft, "encoder.features.block1.0.weight")  # the whole model trains


def test_finetune_last_block_leaves_the_rest_of_the_encoder(runs: dict[str, StageResult]) -> None:
    base, ft = weights(runs["baseline"]), weights(runs["finetune_last_block"])
    assert same(base, ft, "encoder.features.block1") and same(base, ft, "encoder.features.block2")
    assert not same(base, ft, "encoder.features.block3.0") and not same(base, ft, "heads.shared")


def test_mixed_trains_on_both_datasets(runs: dict[str, StageResult], catalog: pd.DataFrame) -> None:
    mixed, base = done(runs["mixed"]), done(runs["baseline"])
    assert mixed["train_rows"] > base["train_rows"]
    assert mixed["val_rows"] > base["val_rows"]  # validates on the photos it trains on, too


def test_one_head_retrained_on_a_frozen_encoder(runs: dict[str, StageResult]) -> None:
    two, one = weights(runs["two_heads"]), weights(runs["chexpert_head"])
    assert same(two, one, "encoder.") and same(two, one, "heads.chexphoto")  # BN statistics included
    assert not same(two, one, "heads.chexpert")


def test_router_trains_alone_and_routes(runs: dict[str, StageResult]) -> None:
    two, routed = weights(runs["two_heads"]), weights(runs["router"])
    assert same(two, routed, "encoder.") and same(two, routed, "heads.")
    assert "router.weight" in routed and "router.weight" not in two
    table = pd.read_parquet(runs["router"].out_dir / "predictions_test.parquet")
    assert table["router_prob"].between(0, 1).all()
    # Router accuracy per kind on validation is reported in the bundle and the metrics.
    val = pd.read_parquet(runs["router"].out_dir / "predictions_val.parquet")
    meta = json.loads((runs["router"].out_dir / "model.json").read_text())
    right = (val["router_prob"] > 0.5) == (val["domain"] == "photo")
    assert meta["router"]["overall"] == pytest.approx(right.mean())
    assert set(meta["router"]["per_kind"]) == set(val["kind"])
    assert runs["router"].metrics["val/router"] == meta["router"]
    # Scored as deployed: each image goes to the head the router picks; the oracle routing (each
    # image's domain head) is saved beside it, and the router's mistakes change the numbers.
    assert (table["head"] == np.where(table["router_prob"] > 0.5, "chexphoto", "chexpert")).all()
    oracle = pd.read_parquet(runs["router"].out_dir / "predictions_test_oracle.parquet")
    assert (oracle["head"] == oracle["domain"].map({"photo": "chexphoto", "digital": "chexpert"})).all()
    assert oracle["path"].tolist() == table["path"].tolist()
    wrong = (table["head"] != oracle["head"]).to_numpy()
    assert wrong.any()  # a 3-step router errs on some test images
    probs = [f"prob_{s}" for s in SLUGS]
    assert np.array_equal(table.loc[~wrong, probs], oracle.loc[~wrong, probs])
    routed_metrics = json.loads((runs["router"].out_dir / "metrics_test.json").read_text())["groups"]
    oracle_metrics = json.loads((runs["router"].out_dir / "metrics_test_oracle.json").read_text())["groups"]
    assert routed_metrics != oracle_metrics
    assert runs["router"].metrics["test/Standard"] == routed_metrics["Standard"]["at_0.5"]
    # Thresholds are tuned on the validation rows each head serves through the router.
    tuned = tune_head_thresholds(val)
    assert {head: meta["thresholds"][head] for head in tuned} == tuned
    assert (runs["router"].out_dir / "predictions_val_oracle.parquet").exists()


def test_new_heads_on_a_shared_head_model_keep_its_encoder(runs: dict[str, StageResult]) -> None:
    mixed, new = weights(runs["mixed"]), weights(runs["new_heads"])
    assert same(mixed, new, "encoder.") and "heads.shared.weight" not in new
    # New heads start from the mixed model's only head; the untrained one is still that head.
    assert torch.equal(new["heads.chexphoto.weight"], mixed["heads.shared.weight"])
    assert not torch.equal(new["heads.chexpert.weight"], mixed["heads.shared.weight"])


def test_thresholds_are_tuned_per_head_on_the_rows_it_serves(runs: dict[str, StageResult]) -> None:
    r = runs["two_heads"]
    meta = json.loads((r.out_dir / "model.json").read_text())
    val = pd.read_parquet(r.out_dir / "predictions_val.parquet")
    for head in ("chexpert", "chexphoto"):
        part = val.loc[val["head"] == head]
        assert len(part) and set(part["domain"]) == {"digital" if head == "chexpert" else "photo"}
        assert meta["thresholds"][head] == pytest.approx(tune_thresholds(*arrays(part)))


def test_metrics_json_equals_sklearn_on_the_predictions(runs: dict[str, StageResult]) -> None:
    r = runs["baseline"]
    doc = json.loads((r.out_dir / "metrics_test.json").read_text())
    table = pd.read_parquet(r.out_dir / "predictions_test.parquet")
    thresholds = json.loads((r.out_dir / "model.json").read_text())["thresholds"]["shared"]
    for group, dataset in (("Standard", "chexpert"), ("Photos", "chexphoto")):
        part = table.loc[table["dataset"] == dataset]
        entry = doc["groups"][group]
        assert entry["n"] == len(part)
        for slug in SLUGS:
            keep = part[f"mask_{slug}"].to_numpy() == 1
            y, p = part[f"target_{slug}"].to_numpy()[keep], part[f"prob_{slug}"].to_numpy()[keep]
            auc = roc_auc_score(y, p) if 0 < y.sum() < len(y) else None
            assert entry["at_0.5"][slug]["auc"] == (pytest.approx(auc) if auc is not None else None)
            assert entry["at_0.5"][slug]["mcc"] == pytest.approx(matthews_corrcoef(y, p >= 0.5))
            assert entry["tuned"][slug]["mcc"] == pytest.approx(matthews_corrcoef(y, p >= thresholds[slug]))
            assert entry["at_0.5"][slug]["positives"] == y.sum()
        aucs = [entry["at_0.5"][s]["auc"] for s in SLUGS if entry["at_0.5"][s]["auc"] is not None]
        assert entry["at_0.5"]["average"]["auc"] == pytest.approx(np.mean(aucs))


def test_bad_stage_setups_fail_clearly(demo_root: Path, catalog: pd.DataFrame, tmp_path: Path) -> None:
    with pytest.raises(StageError, match="no training rows"):
        train_stage(
            tiny("f", data={"train": ["chexpert"], "kinds": ["film"]}),
            demo_root,
            tmp_path / "f",
            catalog=catalog,
            progress=False,
        )
    with pytest.raises(StageError, match="refers to another stage"):
        train_stage(
            tiny("r", init="stage:baseline"), demo_root, tmp_path / "r", catalog=catalog, progress=False
        )


def test_every_bundle_describes_itself(runs: dict[str, StageResult]) -> None:
    """A model card with bootstrap CIs per comparison and photo kind, `chextrain info`, a small model.json."""
    from typer.testing import CliRunner

    from chextrain.cli import build_app

    for name, r in runs.items():
        assert (r.out_dir / "model.json").stat().st_size < 50_000, name
        card = (r.out_dir / "README.md").read_text()
        assert "Not a medical device" in card and "| test | Standard - Photos |" in card, name
        assert "| test | photos: natural |" in card and " to " in card  # value (low to high)
        result = CliRunner().invoke(build_app(), ["info", str(r.out_dir)], env={"COLUMNS": "80"})
        assert result.exit_code == 0 and f"stage: {name}" in result.output, result.output
        assert max(map(len, result.output.splitlines())) <= 80


def test_keep_checkpoints(demo_root: Path, catalog: pd.DataFrame, tmp_path: Path) -> None:
    def run(name: str, **keys: Any) -> Path:
        stage = tiny(name, **keys)
        return train_stage(stage, demo_root, tmp_path / name, catalog=catalog, progress=False).out_dir

    assert not (run("none", keep_checkpoints="none") / "checkpoints").exists()
    best = run("best", keep_checkpoints="best")
    assert [p.name for p in (best / "checkpoints").iterdir()] == ["best.ckpt"]
    every = run("all", keep_checkpoints="all", select="best")
    assert sorted(p.name for p in (every / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    assert done_of(every)["weights"] == "best"


def done_of(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "done.json").read_text())


def test_mlflow_run_is_read_back_from_its_local_store(
    demo_root: Path, catalog: pd.DataFrame, tmp_path: Path
) -> None:
    """A stage of a study logs to MLflow's local store in the study folder: config, metrics, bundle."""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    study = tmp_path / "study"
    (study / "stages").mkdir(parents=True)
    (study / "study.json").write_text(json.dumps({"name": "tiny_study", "stages": []}))
    stage = tiny("logged", logger=["csv", "mlflow"])
    out = train_stage(stage, demo_root, study / "stages" / "logged", catalog=catalog, progress=False).out_dir
    assert not (out / "logs" / "tensorboard").exists() and (out / "logs" / "csv" / "metrics.csv").exists()
    client = MlflowClient(f"sqlite:///{study / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tiny_study")
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "logged" and run.info.status == "FINISHED"
    assert run.data.params["batch_size"] == "8" and run.data.params["config_hash"]
    assert run.data.params["bundle"] == str((out / "model.json").resolve())
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert len(history) >= 1 and all(np.isfinite(m.value) for m in history)
    assert run.data.metrics["eval/test/Standard/auc"] == pytest.approx(
        json.loads((out / "done.json").read_text())["metrics"]["test/Standard"]["average"]["auc"]
    )
    assert "eval/test/kind_natural/mcc" in run.data.metrics
    assert json.loads((out / "logs" / "runs.json").read_text()) == {"mlflow": run.info.run_id}


def test_a_logger_that_is_not_installed_is_refused_before_anything_is_written(
    demo_root: Path, catalog: pd.DataFrame, tmp_path: Path
) -> None:
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed")
    with pytest.raises(StageError, match=r"chextrain\[wandb\]"):
        train_stage(tiny("w", logger=["wandb"]), demo_root, tmp_path / "w", catalog=catalog, progress=False)
    assert not (tmp_path / "w").exists()


def test_a_stage_that_evaluates_test_only_still_saves_validation_predictions(
    runs: dict[str, StageResult], catalog: pd.DataFrame
) -> None:
    """A fixed-budget stage (evaluate: [test]) keeps the validation predictions its thresholds came from."""
    r = runs["budget"]
    val = pd.read_parquet(r.out_dir / "predictions_val.parquet")
    assert set(val["split"]) == {"val"} and len(val) == done(r)["val_rows"] > 0
    assert "test/Standard" in r.metrics and not any(k.startswith("val/") for k in r.metrics)
    assert not (r.out_dir / "metrics_val.json").exists()  # predictions saved, the split not evaluated
    meta = json.loads((r.out_dir / "model.json").read_text())
    assert meta["thresholds"] == tune_head_thresholds(val) and meta["config"]["evaluate"] == ["test"]


@pytest.mark.parametrize("hook", ["setup", "on_train_batch_start"])
def test_ctrl_c_during_fit_is_a_keyboard_interrupt_not_lightnings_exit(
    demo_root: Path, catalog: pd.DataFrame, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hook: str
) -> None:
    """Lightning ends a fit interrupted by Ctrl-C with sys.exit(1); the stage says it was a Ctrl-C
    (the command line prints one line and exits 130, a slot ends quietly), keeps nothing as done and
    hands SIGINT its handler back (Lightning leaves it ignored)."""
    import signal

    from lightning.pytorch.callbacks import Callback

    from chextrain.training import lifecycle

    def ctrl_c(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    # In setup, before Lightning saves the signal handlers it restores at teardown; in a batch, after.
    CtrlC = type("CtrlC", (Callback,), {hook: ctrl_c})

    build = lifecycle.build_trainer

    def with_ctrl_c(*args: Any, **kwargs: Any) -> Any:
        trainer = build(*args, **kwargs)
        trainer.callbacks.append(CtrlC())
        return trainer

    monkeypatch.setattr(lifecycle, "build_trainer", with_ctrl_c)
    handler = signal.getsignal(signal.SIGINT)
    assert handler not in (signal.SIG_IGN, None)
    try:
        with pytest.raises(KeyboardInterrupt):
            train_stage(tiny("stopped"), demo_root, tmp_path / "stopped", catalog=catalog, progress=False)
        assert signal.getsignal(signal.SIGINT) is handler  # Lightning set SIG_IGN; the stage gives it back
    finally:
        signal.signal(signal.SIGINT, handler)
    assert not (tmp_path / "stopped" / "done.json").exists()


def test_a_resumed_stage_keeps_the_csv_rows_of_its_earlier_run(tmp_path: Path) -> None:
    """Lightning's CSV logger deletes the metrics.csv of a folder it opens again; the stage moves the
    earlier run's folder aside first, so a resume after a kill loses no row."""
    from chextrain.training.loggers import build_loggers

    spec = tiny("csv", logger=["csv"]).logger

    def one_run(step: int) -> None:
        (csv,) = build_loggers(spec, tmp_path, "csv")
        csv.log_metrics({"train/loss": 1.0 / step}, step=step)
        csv.save()

    one_run(1)  # killed after this
    one_run(2)  # resumed
    one_run(3)  # resumed again
    rows = {
        folder: pd.read_csv(tmp_path / "logs" / folder / "metrics.csv")["step"].tolist()
        for folder in ("csv-1", "csv-2", "csv")
    }
    assert rows == {"csv-1": [1], "csv-2": [2], "csv": [3]}
