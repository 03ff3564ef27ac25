"""Batch inference into a predictions table, and a run's evaluation (parquet + metrics.json).

Every number in a report regenerates from the predictions tables written here: one row per
image with its identity columns, the head that scored it, and per pathology `prob_<slug>`,
`target_<slug>` and `mask_<slug>` (targets and mask from the stage's uncertainty policy).

One pass over a split gives the table and, when asked for, every row's OOD features (those of
the validation split calibrate the bundle's OOD check): each batch (uint8, from loader workers
decoding the files or reading the prepared image store) runs `ood.ScoringNet` through
`ood.run_batch`, which makes it the network input on the model's device and hands back float32
on the CPU.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from chextrain.data.catalog import read_catalog
from chextrain.data.dataset import CatalogDataset, collate
from chextrain.data.loader import worker_init
from chextrain.data.splits import assign_splits
from chextrain.data.store import ImageStore
from chextrain.data.transforms import Decoding, Preprocessing, as_preprocessing
from chextrain.errors import ChextrainError
from chextrain.evaluation.metrics import pathology_metrics, tune_thresholds
from chextrain.fileio import atomic_write, write_json
from chextrain.labels import SLUGS, Policy
from chextrain.models.bundle import load_bundle
from chextrain.models.net import CXRNet
from chextrain.ood import OODError, ScoringNet, calibrate_ood, feature_groups, run_batch

ID_COLUMNS: tuple[str, ...] = ("path", "dataset", "domain", "kind", "patient", "study", "image", "view")
# Carried from the catalog when present (tables written before them still read): which release and
# CSV a row came from, and the columns subgroups are drawn from.
DESCRIBE_COLUMNS: tuple[str, ...] = ("release", "source", "sex", "age", "ap_pa")
ROUTED = "router"  # head= value that lets the model's router pick each image's head
ORACLE = "oracle"  # a routed model's predictions with each image's head picked from its known domain
GROUPS: dict[str, tuple[str, str]] = {
    "Standard": ("dataset", "chexpert"),
    "Photos": ("dataset", "chexphoto"),
    "Other": ("dataset", "other"),
}


class EvaluationError(ChextrainError):
    """An evaluation that cannot run as asked (unknown split or head, no rows)."""


@dataclass(frozen=True)
class Predictions:
    """The predictions table of some catalog rows and, when asked for, their OOD features.

    features: N x D float32 ScoringNet features, row-aligned with `table` (None unless asked).
    oracle: with head="router", the same rows with each image's head picked from its known domain
    instead (oracle routing), from the same pass; None otherwise.
    """

    table: pd.DataFrame
    features: np.ndarray | None = None
    oracle: pd.DataFrame | None = None


def default_workers() -> int:
    """Loader worker processes for evaluation: min(4, CPUs - 1); 0 (load in-process) on one CPU."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(0, min(4, cpus - 1))


def eval_loader(
    dataset: CatalogDataset, batch_size: int, num_workers: int | None, device: torch.device
) -> DataLoader:
    """The in-order loader every evaluation pass uses (uint8 batches; default_workers() when None)."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=default_workers() if num_workers is None else num_workers,
        shuffle=False,
        pin_memory=device.type == "cuda",
        collate_fn=collate,
        worker_init_fn=worker_init,
    )


def predict_rows(
    model: CXRNet,
    rows: pd.DataFrame,
    *,
    head: str | None = None,
    domain_heads: Mapping[str, str] | None = None,
    image_size: int,
    preprocessing: str | Preprocessing | Mapping[str, Any] = "imagenet",
    batch_size: int = 64,
    num_workers: int | None = None,
    policy: Policy = "ones",
    device: str | torch.device | None = None,
    ood_features: bool = False,
    store: ImageStore | None = None,
) -> Predictions:
    """Score catalog rows in one pass: the predictions table (same rows, same order) and OOD features.

    head: a head name for every image; None to pick each image's head by its domain through
    `domain_heads`; or "router" to let the model's router pick the domain (as at deployment; the
    result's `oracle` then holds the domain_heads choice from the same pass).
    device: where the model runs (it is moved there and left there); None: CUDA when available.
    num_workers: loader processes (None: `default_workers()`; 0 loads in this process).
    store: read the images from this prepared image store (built first where rows are missing).
    """
    if head == ROUTED and model.router is None:
        raise EvaluationError("head='router' needs a model with a domain router")
    if domain_heads is None and len(model.head_names) == 1:
        domain_heads = {"digital": model.head_names[0], "photo": model.head_names[0]}
    fixed = head if head not in (None, ROUTED) else None
    dataset = CatalogDataset(
        rows,
        image_size=image_size,
        preprocessing=preprocessing,
        policy=policy,
        head_names=model.head_names,
        domain_heads=None if fixed else domain_heads,
        head=fixed,
        images=None if store is None else store.prepare(rows["path"].astype(str).tolist()),
    )
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    loader = eval_loader(dataset, batch_size, num_workers, device)
    if head == ROUTED:
        names = list(model.head_names)
        by_domain = np.array([names.index(domain_heads["digital"]), names.index(domain_heads["photo"])])
    was_training = model.training
    net = ScoringNet(model.eval().to(device), logits=True)
    probs, heads, routers, features = [], [], [], []
    oracle_probs, oracle_heads = [], []  # head="router": each image's domain head, same pass
    try:
        for batch in loader:
            out = run_batch(
                net, batch["image"], dataset.spec
            )  # logits B x heads x 5, [router B,] features B x D
            r = torch.sigmoid(torch.from_numpy(out[1])).numpy() if len(out) == 3 else None
            h = by_domain[(r > 0.5).astype(np.int64)] if head == ROUTED else batch["head"].numpy()
            # The sigmoid of each row's own head, B x 5, as before: CPU kernels round a value by its
            # place in the tensor (vector lanes vs tail), so the shape keeps the stored bytes.
            probs.append(torch.sigmoid(torch.from_numpy(out[0][np.arange(len(h)), h])).numpy())
            heads.append(h)
            if head == ROUTED:
                d = batch["head"].numpy()
                oracle_probs.append(torch.sigmoid(torch.from_numpy(out[0][np.arange(len(d)), d])).numpy())
                oracle_heads.append(d)
            if r is not None:
                routers.append(r)
            if ood_features:
                features.append(out[-1])
    finally:
        model.train(was_training)
    router = np.concatenate(routers) if routers else np.zeros(0, np.float32)
    table = _table(rows, dataset, model.head_names, probs, heads, None if model.router is None else router)
    oracle = None
    if head == ROUTED:
        oracle = _table(rows, dataset, model.head_names, oracle_probs, oracle_heads, router)
    if not ood_features:
        return Predictions(table, oracle=oracle)
    width = sum(size for _, size in feature_groups(model))
    found = np.concatenate(features) if features else np.zeros((0, width), np.float32)
    return Predictions(table, found, oracle)


def _table(
    rows: pd.DataFrame,
    dataset: CatalogDataset,
    head_names: list[str] | tuple[str, ...],
    probs: list[np.ndarray],
    heads: list[np.ndarray],
    router: np.ndarray | None,
) -> pd.DataFrame:
    """The predictions table of `rows` from per-batch probabilities (B x 5) and head indices (B)."""
    p = np.concatenate(probs) if probs else np.zeros((0, len(SLUGS)), np.float32)
    h = np.concatenate(heads) if heads else np.zeros(0, np.int64)
    present = [c for c in DESCRIBE_COLUMNS if c in rows.columns]
    table = rows.reset_index(drop=True).reindex(columns=[*ID_COLUMNS, *present]).copy()
    table["split"] = rows["split"].to_numpy() if "split" in rows else ""
    table["head"] = np.asarray(head_names, dtype=object)[h] if len(h) else np.array([], dtype=object)
    if router is not None:
        table["router_prob"] = router
    targets, mask = dataset.targets.numpy(), dataset.mask.numpy()
    for j, slug in enumerate(SLUGS):
        table[f"prob_{slug}"] = p[:, j]
        table[f"target_{slug}"] = targets[:, j]
        table[f"mask_{slug}"] = mask[:, j]
    return table


def deployed_head(model: CXRNet, domain_heads: Mapping[str, str] | None) -> str | None:
    """ROUTED when the model's router picks between two heads (score it as deployed), else None.

    None picks each image's head by its known domain through domain_heads (the same as the router
    when a single head serves both domains).
    """
    heads = set((domain_heads or {}).values())
    return ROUTED if model.router is not None and len(heads) > 1 else None


def bundle_store(folder: str | Path, meta: Mapping[str, Any]) -> ImageStore:
    """The image store in `folder` at a bundle's image size and resize mode."""
    spec = as_preprocessing(meta.get("preprocessing", "imagenet"))
    return ImageStore(folder, Decoding(int(meta["image_size"]), spec.resize))


def predict(model: CXRNet, rows: pd.DataFrame, **kwargs: Any) -> pd.DataFrame:
    """The predictions table of catalog rows: `predict_rows(model, rows, **kwargs).table`.

    Takes predict_rows's keyword arguments (image_size is required).
    """
    return predict_rows(model, rows, **kwargs).table


def arrays(table: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(targets, probs, mask), each N x 5 in SLUGS order, from a predictions table."""

    def pick(prefix: str) -> np.ndarray:
        return table[[f"{prefix}_{s}" for s in SLUGS]].to_numpy(dtype=np.float64)

    return pick("target"), pick("prob"), pick("mask")


def calibrate_ood_or_none(model: CXRNet, features: np.ndarray | None) -> dict[str, Any] | None:
    """The bundle's meta["ood"] from validation features (`ood.calibrate_ood`), or None.

    None when there are no features or too few images to calibrate; predictions then say
    "uncalibrated".
    """
    if features is None or len(features) == 0:
        return None
    try:
        return calibrate_ood(model, features)
    except OODError:
        return None


def router_accuracy(table: pd.DataFrame) -> dict[str, Any] | None:
    """Share of rows the router sends to the right domain (P(photo) > 0.5 iff a photo), per kind."""
    if "router_prob" not in table or table.empty:
        return None
    right = (table["router_prob"].to_numpy() > 0.5) == (table["domain"].to_numpy() == "photo")
    kinds = table["kind"].to_numpy()
    per_kind = {str(k): float(right[kinds == k].mean()) for k in sorted(set(kinds))}
    return {"overall": float(right.mean()), "per_kind": per_kind, "n": int(len(table))}


def tune_head_thresholds(table: pd.DataFrame) -> dict[str, dict[str, float]]:
    """Per head, thresholds maximising MCC on the rows that head scored (validation predictions)."""
    out = {}
    for head, part in table.groupby("head", sort=True):
        targets, probs, mask = arrays(part)
        out[str(head)] = {k: float(v) for k, v in tune_thresholds(targets, probs, mask).items()}
    return out


def group_metrics(
    table: pd.DataFrame, thresholds: Mapping[str, Mapping[str, float]] | None = None
) -> dict[str, Any]:
    """Metrics per group: Standard (CheXpert), Photos (CheXphoto), Other, and each photo kind.

    Each group: n, heads, `at_0.5` (the paper's threshold) and, when one head scored the whole
    group and has tuned thresholds, `tuned`; each of those maps slug|average -> metrics.
    """
    masks = {name: table[col] == value for name, (col, value) in GROUPS.items()}
    for kind in sorted(table["kind"].dropna().unique()):
        masks[f"kind:{kind}"] = table["kind"] == kind
    out: dict[str, Any] = {}
    for name, select in masks.items():
        part = table.loc[select.to_numpy()]
        if part.empty:
            continue
        targets, probs, mask = arrays(part)
        heads = sorted(part["head"].astype(str).unique())
        entry: dict[str, Any] = {
            "n": len(part),
            "patients": int(part["patient"].nunique()),
            "heads": heads,
            "at_0.5": pathology_metrics(targets, probs, mask, dict.fromkeys(SLUGS, 0.5)),
        }
        if len(heads) == 1 and thresholds and heads[0] in thresholds:
            entry["thresholds"] = dict(thresholds[heads[0]])
            entry["tuned"] = pathology_metrics(targets, probs, mask, dict(thresholds[heads[0]]))
        out[name] = entry
    return out


def write_predictions(table: pd.DataFrame, out_dir: Path, suffix: str) -> Path:
    """Write out_dir/predictions_<suffix>.parquet atomically; returns its path."""
    path = Path(out_dir) / f"predictions_{suffix}.parquet"
    atomic_write(path, lambda p: table.to_parquet(p, index=False))
    return path


def write_evaluation(
    table: pd.DataFrame,
    out_dir: Path,
    split: str,
    head: str | None,
    thresholds: Mapping[str, Mapping[str, float]] | None,
    *,
    routing: str | None = None,
) -> dict[str, Any]:
    """Write predictions_<split>[_<head>].parquet and metrics_<split>[_<head>].json; return the metrics.

    routing: ORACLE for the oracle-routed table of a routed model (files
    predictions_<split>_oracle.parquet / metrics_<split>_oracle.json; the document says `routing`).
    """
    suffix = "_".join(x for x in (split, head, routing) if x)
    out_dir = Path(out_dir)
    write_predictions(table, out_dir, suffix)
    document = {
        "split": split,
        "head": head,
        "n": len(table),
        "pathologies": list(SLUGS),
        "thresholds": {h: dict(t) for h, t in (thresholds or {}).items()},
        "groups": group_metrics(table, thresholds),
    }
    if routing:
        document["routing"] = routing
    write_json(out_dir / f"metrics_{suffix}.json", document, newline=True)
    return document


def evaluate_run(
    run_dir: Path,
    data_root: Path | None = None,
    split: str = "test",
    head: str | None = None,
    *,
    catalog: pd.DataFrame | None = None,
    batch_size: int = 64,
    num_workers: int | None = None,
    store: str | Path | None = None,
) -> dict[str, Any]:
    """Score a finished run's bundle on a split of the data and write its predictions and metrics.

    Without `head`, a bundle whose router picks between two heads is scored through its router (as
    deployed) and its oracle routing is written beside (predictions_<split>_oracle.parquet).

    The split is rebuilt with the run's own split settings (model.json `config.split`), so `val`
    is the same validation set the run tuned its thresholds on. `store`: a prepared image store
    folder to read the images from (the same pixels as the files). Returns the metrics document.
    """
    if split not in ("val", "test"):
        raise EvaluationError(f"split {split!r}: expected 'val' or 'test'")
    model, meta = load_bundle(Path(run_dir))
    if head is not None and head != ROUTED and head not in model.head_names:
        raise EvaluationError(
            f"head {head!r}: the bundle in {run_dir} has heads {model.head_names}"
            + (" (or 'router')" if model.router is not None else "")
        )
    config = meta.get("config") or {}
    if catalog is None:
        if data_root is None:
            raise EvaluationError("evaluate_run needs data_root or a catalog")
        catalog = read_catalog(Path(data_root))
    catalog = assign_splits(catalog, **(config.get("split") or {}))
    rows = catalog.loc[catalog["split"] == split].reset_index(drop=True)
    if rows.empty:
        raise EvaluationError(f"no catalog rows in split {split!r} under {data_root}")
    routed = head is None and deployed_head(model, meta.get("domain_heads")) == ROUTED
    found = predict_rows(
        model,
        rows,
        head=ROUTED if routed else head,
        domain_heads=meta.get("domain_heads"),
        image_size=int(meta["image_size"]),
        preprocessing=meta.get("preprocessing", "imagenet"),
        batch_size=batch_size,
        num_workers=num_workers,
        policy=config.get("policy", "ones"),
        store=None if store is None else bundle_store(store, meta),
    )
    if routed and found.oracle is not None:  # the router's picks are the numbers; oracle routing beside
        write_evaluation(found.oracle, Path(run_dir), split, None, meta.get("thresholds"), routing=ORACLE)
    return write_evaluation(found.table, Path(run_dir), split, head, meta.get("thresholds"))
