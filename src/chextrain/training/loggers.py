"""A stage's experiment loggers, picked by name (`logger:` in the stage), all through Lightning's.

- `tensorboard` (default) and `csv`: files under STAGE/logs/.
- `mlflow`: Lightning's MLFlowLogger. By default a local store, no server: a SQLite database
  `mlflow.db` (MLflow's recommended local backend; its plain-file store is deprecated) and
  artifacts in `mlartifacts/`, both in the study folder when the stage runs in a study
  (DIR/stages/NAME) and in the stage folder otherwise; the experiment is the study's name.
  `mlflow: {tracking_uri: ..., experiment: ...}` points elsewhere. Needs `chextrain[mlflow]`.
- `wandb`: Lightning's WandbLogger, offline by default (no network; `wandb sync` uploads later),
  files under STAGE/logs/wandb. Needs `chextrain[wandb]`.

Each logger gets the resolved config as hyperparameters, the training metrics as Lightning logs
them, and at the end the evaluation metrics and the bundle's path. A resumed stage continues the
same MLflow / W&B run (its id is kept in STAGE/logs/runs.json); its CSV log goes on in a fresh
logs/csv, the earlier run's moved to logs/csv-1 (csv-2, ...) first (`keep_earlier_csv`).
"""

from __future__ import annotations

import importlib.util
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, Logger, MLFlowLogger, TensorBoardLogger, WandbLogger

from chextrain.fileio import write_json
from chextrain.training.specs import LoggerSpec
from chextrain.training.stage import StageError

LOGS_DIR, RUNS_FILE, STUDY_FILE = "logs", "runs.json", "study.json"
EXTRAS = {"mlflow": "mlflow", "wandb": "wandb"}  # logger -> (package, chextrain extra)


def check_loggers(spec: LoggerSpec) -> None:
    """Refuse, before anything is written, a logger whose package is not installed (naming the extra)."""
    for name, package in EXTRAS.items():
        if getattr(spec, name) is not None and importlib.util.find_spec(package) is None:
            raise StageError(
                f"logger: {name} needs the {package} package, which is not installed: "
                f"pip install 'chextrain[{name}]' (or remove {name} from the stage's logger list)"
            )


def tracking_root(out_dir: Path) -> tuple[Path, str]:
    """(folder for a local MLflow store, experiment name): the study folder and its name when
    out_dir is DIR/stages/NAME of a study, else out_dir and "chextrain"."""
    out_dir = Path(out_dir).resolve()
    study = out_dir.parent.parent
    if out_dir.parent.name == "stages" and (study / STUDY_FILE).is_file():
        try:
            name = json.loads((study / STUDY_FILE).read_text()).get("name")
        except (OSError, ValueError):
            name = None
        return study, str(name or study.name)
    return out_dir, "chextrain"


def _runs(out_dir: Path) -> dict[str, str]:
    path = Path(out_dir) / LOGS_DIR / RUNS_FILE
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {k: str(v) for k, v in found.items()} if isinstance(found, dict) else {}


def _mlflow_logger(spec: Any, out_dir: Path, name: str, run_id: str | None) -> MLFlowLogger:
    from filelock import FileLock
    from mlflow.tracking import MlflowClient

    root, experiment = tracking_root(out_dir)
    experiment = spec.experiment or experiment
    uri = spec.tracking_uri or f"sqlite:///{root / 'mlflow.db'}"
    if spec.tracking_uri is None:  # create the local store and the experiment once, whoever comes first
        with FileLock(str(root / "mlflow.db.lock")):
            client = MlflowClient(uri)
            if client.get_experiment_by_name(experiment) is None:
                client.create_experiment(experiment, artifact_location=(root / "mlartifacts").as_uri())
    return MLFlowLogger(
        experiment_name=experiment,
        run_name=name,
        tracking_uri=uri,
        run_id=run_id,
        tags={"chextrain.stage": name, "chextrain.out_dir": str(Path(out_dir).resolve())},
    )


def keep_earlier_csv(logs: Path) -> Path | None:
    """Move logs/csv aside (to csv-1, csv-2, ...) when it holds a metrics.csv; returns where to.

    Lightning's CSV logger deletes the metrics.csv of a folder it opens again, so a stage resumed
    after a kill would lose the rows of its earlier run. Only global rank 0 moves anything (the
    only rank that writes the file; the others must not move the folder rank 0 has just started).
    """
    folder = logs / "csv"
    if getattr(rank_zero_only, "rank", 0) != 0 or not (folder / "metrics.csv").is_file():
        return None
    k = 1
    while (logs / f"csv-{k}").exists():
        k += 1
    return folder.rename(logs / f"csv-{k}")


def build_loggers(spec: LoggerSpec, out_dir: Path, name: str) -> list[Logger]:
    """The stage's Lightning loggers, in the order tensorboard, csv, mlflow, wandb."""
    check_loggers(spec)
    runs = _runs(out_dir)
    loggers: list[Logger] = []
    if spec.tensorboard is not None:
        loggers.append(
            TensorBoardLogger(out_dir, name=LOGS_DIR, version="tensorboard", default_hp_metric=False)
        )
    if spec.csv is not None:
        keep_earlier_csv(Path(out_dir) / LOGS_DIR)
        loggers.append(CSVLogger(out_dir, name=LOGS_DIR, version="csv"))
    if spec.mlflow is not None:
        loggers.append(_mlflow_logger(spec.mlflow, out_dir, name, runs.get("mlflow")))
    if spec.wandb is not None:
        w = spec.wandb
        save = Path(out_dir) / LOGS_DIR
        save.mkdir(parents=True, exist_ok=True)
        loggers.append(
            WandbLogger(
                name=name,
                project=w.project,
                entity=w.entity,
                save_dir=str(save),
                offline=w.offline,
                id=runs.get("wandb"),
                resume="allow" if runs.get("wandb") else None,
            )
        )
    return loggers


class RememberRuns(Callback):
    """Writes STAGE/logs/runs.json (the MLflow run id, the W&B run id) when training starts, on rank 0,
    so that a resumed stage logs into the same runs."""

    def __init__(self, out_dir: Path) -> None:
        self.path = Path(out_dir) / LOGS_DIR / RUNS_FILE

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        runs = {}
        for lg in trainer.loggers:
            if isinstance(lg, MLFlowLogger):
                runs["mlflow"] = lg.run_id
            elif isinstance(lg, WandbLogger):
                runs["wandb"] = lg.version
        if runs:
            write_json(self.path, runs)


def metric_items(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Evaluation metrics as flat `eval/<split>/<group>/<metric>` numbers (averages; AUC per pathology).

    Keys keep to letters, digits, `_ / . -` (what every logger accepts: `kind:natural` -> `kind_natural`).
    """
    out: dict[str, float] = {}
    for group, per in metrics.items():
        if not isinstance(per, Mapping):
            continue
        key = f"eval/{group}".replace(":", "_")
        for metric, value in (per.get("average") or {}).items():
            out[f"{key}/{metric}"] = float(value)
        for slug, entry in per.items():
            if slug != "average" and isinstance(entry, Mapping) and "auc" in entry:
                out[f"{key}/auc_{slug}"] = float(entry["auc"])
            elif isinstance(entry, int | float) and not isinstance(entry, bool):
                out[f"{key}/{slug}"] = float(entry)
    return {k: v for k, v in out.items() if math.isfinite(v)}


def log_outcome(loggers: list[Logger], metrics: Mapping[str, Any], bundle: Path, step: int) -> None:
    """Log the evaluation metrics and the bundle's path to every logger, then close them (rank 0)."""
    items = metric_items(metrics)
    for lg in loggers:
        lg.log_hyperparams({"bundle": str(Path(bundle).resolve())})
        if items:
            lg.log_metrics(items, step=step)
        lg.save()
        lg.finalize("success")
