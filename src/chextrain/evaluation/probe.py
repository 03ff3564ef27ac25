"""Is a representation any good? Linear probe and kNN on frozen encoder features, and photo/x-ray closeness.

The encoder stays frozen: each image becomes its pooled features (B x F), a logistic regression
(scikit-learn, on standardised features) and a k-nearest-neighbour classifier (cosine distance)
learn each pathology from the train split's features, and their scores on the evaluation split
give an AUC per pathology. This measures the representation itself, as MoCo papers do.

`pair_similarity` asks whether the encoder sees a photo as the x-ray it shows: the mean cosine
similarity of the features of a digital x-ray and a photo of the same x-ray (same patient / study
/ image) against that of a digital x-ray and a photo of another one. Features are centred on their
mean over the rows compared first: pooled ReLU features are all positive, and uncentred their
cosines are all close to 1 whatever the images show.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from chextrain.data.catalog import pair_keys, read_catalog
from chextrain.data.dataset import CatalogDataset
from chextrain.data.splits import assign_splits
from chextrain.data.store import ImageStore
from chextrain.data.transforms import Preprocessing
from chextrain.errors import ChextrainError
from chextrain.evaluation.predict import GROUPS, bundle_store, eval_loader
from chextrain.fileio import write_json
from chextrain.labels import SLUGS, Policy, apply_policy
from chextrain.models.bundle import load_bundle
from chextrain.models.net import CXRNet
from chextrain.ood import run_batch

PROBE_FILE = "probe.json"
METHODS: tuple[str, ...] = ("linear", "knn")


class ProbeError(ChextrainError):
    """A probe that cannot run as asked (empty split, bad k or c)."""


def encode(
    model: CXRNet,
    rows: pd.DataFrame,
    *,
    image_size: int,
    preprocessing: str | Preprocessing | dict[str, Any] = "imagenet",
    batch_size: int = 64,
    num_workers: int | None = 0,
    device: str | torch.device | None = None,
    store: ImageStore | None = None,
) -> np.ndarray:
    """Pooled encoder features of catalog rows, N x F float32 (eval mode, no augmentation).

    device: where the model runs (moved there and left there); None: CUDA when available.
    num_workers: loader processes (None: `default_workers()`).
    store: read the images from this prepared image store (built first where rows are missing).
    """
    dataset = CatalogDataset(
        rows,
        image_size=image_size,
        preprocessing=preprocessing,
        head_names=model.head_names,
        head=model.head_names[0],
        images=None if store is None else store.prepare(rows["path"].astype(str).tolist()),
    )
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    loader = eval_loader(dataset, batch_size, num_workers, device)
    was_training = model.training
    model.eval().to(device)
    try:
        out = [run_batch(model.encoder, batch["image"], dataset.spec)[0] for batch in loader]  # B x F each
    finally:
        model.train(was_training)
    return np.concatenate(out) if out else np.zeros((0, model.num_features), np.float32)


def _fit_columns(train_t: np.ndarray, train_m: np.ndarray, j: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(rows kept, binary targets) of pathology j, or None when they hold a single class."""
    keep = train_m[:, j] > 0
    y = train_t[keep, j].astype(int)
    return (keep, y) if len(np.unique(y)) == 2 else None


def linear_probe(
    train_x: np.ndarray,
    train_t: np.ndarray,
    train_m: np.ndarray,
    test_x: np.ndarray,
    *,
    c: float = 1.0,
    seed: int = 0,
) -> np.ndarray:
    """P(positive) N_test x 5 from one logistic regression per pathology (NaN: one class in training)."""
    probs = np.full((len(test_x), len(SLUGS)), np.nan)
    for j in range(len(SLUGS)):
        fit = _fit_columns(train_t, train_m, j)
        if fit is None:
            continue
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=5000, random_state=seed))
        clf.fit(train_x[fit[0]], fit[1])
        probs[:, j] = clf.predict_proba(test_x)[:, 1]
    return probs


def knn_probe(
    train_x: np.ndarray, train_t: np.ndarray, train_m: np.ndarray, test_x: np.ndarray, *, k: int = 10
) -> np.ndarray:
    """Distance-weighted share of positives among the k cosine-nearest training rows, N_test x 5."""
    probs = np.full((len(test_x), len(SLUGS)), np.nan)
    for j in range(len(SLUGS)):
        fit = _fit_columns(train_t, train_m, j)
        if fit is None:
            continue
        clf = KNeighborsClassifier(n_neighbors=min(k, int(fit[0].sum())), metric="cosine", weights="distance")
        clf.fit(train_x[fit[0]], fit[1])
        probs[:, j] = clf.predict_proba(test_x)[:, 1]
    return probs


def auc_by_pathology(targets: np.ndarray, probs: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """{slug: ROC AUC, "mean": over the defined ones}; NaN where a class is missing or no scores."""
    out: dict[str, float] = {}
    for j, slug in enumerate(SLUGS):
        keep = (mask[:, j] > 0) & np.isfinite(probs[:, j])
        y = targets[keep, j]
        out[slug] = float(roc_auc_score(y, probs[keep, j])) if len(np.unique(y)) == 2 else float("nan")
    finite = [v for v in out.values() if np.isfinite(v)]
    out["mean"] = float(np.mean(finite)) if finite else float("nan")
    return out


def pair_similarity(features: np.ndarray, rows: pd.DataFrame) -> dict[str, Any]:
    """Mean cosine similarity of (digital, photo) feature pairs of the same x-ray vs of different ones.

    features: N x F, row-aligned with `rows` (catalog rows). Returns pair, non_pair, gap (pair -
    non_pair), their counts, and the same per photo kind under by_kind. NaN where none.
    """
    rows = rows.reset_index(drop=True)
    if len(features) != len(rows):
        raise ProbeError(f"features has {len(features)} rows for {len(rows)} catalog rows")
    z = features - features.mean(axis=0, keepdims=True) if len(features) else features
    z = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
    keys = pair_keys(rows).to_numpy()
    digital = np.flatnonzero((rows["domain"] == "digital").to_numpy())
    photo = np.flatnonzero((rows["domain"] == "photo").to_numpy())
    sims = z[digital] @ z[photo].T  # n_digital x n_photo
    same = keys[digital][:, None] == keys[photo][None, :]

    def summary(cols: np.ndarray) -> dict[str, Any]:
        s, m = sims[:, cols], same[:, cols]
        pair = float(s[m].mean()) if m.any() else float("nan")
        non = float(s[~m].mean()) if (~m).any() else float("nan")
        return {
            "pair": pair,
            "non_pair": non,
            "gap": pair - non,
            "n_pairs": int(m.sum()),
            "n_non_pairs": int((~m).sum()),
        }

    kinds = rows["kind"].to_numpy()[photo]
    out = summary(np.arange(len(photo)))
    out["by_kind"] = {kind: summary(np.flatnonzero(kinds == kind)) for kind in sorted(set(kinds))}
    return out


def probe(
    model: CXRNet,
    catalog: pd.DataFrame,
    *,
    image_size: int,
    preprocessing: str | Preprocessing | dict[str, Any] = "imagenet",
    policy: Policy = "ones",
    train_split: str = "train",
    eval_split: str = "test",
    k: int = 10,
    c: float = 1.0,
    batch_size: int = 64,
    num_workers: int = 0,
    seed: int = 0,
    device: str | torch.device | None = None,
    store: ImageStore | None = None,
) -> dict[str, Any]:
    """Linear-probe and kNN AUCs (eval split: all rows and per dataset group) and pair similarity.

    The classifiers learn from every `train_split` row of the catalog (x-rays and photos); the
    catalog must already carry its `split` column (splits.assign_splits). `store`: read the
    images from this prepared image store.
    """
    if k < 1 or c <= 0:
        raise ProbeError(f"k must be >= 1 and c (inverse L2 strength) > 0; got k={k}, c={c}")
    rows = {}
    for name in (train_split, eval_split):
        rows[name] = catalog.loc[catalog["split"] == name].reset_index(drop=True)
        if rows[name].empty:
            raise ProbeError(
                f"no catalog rows in split {name!r} (splits present: {sorted(catalog['split'].unique())})"
            )
    kwargs = {
        "image_size": image_size,
        "preprocessing": preprocessing,
        "batch_size": batch_size,
        "num_workers": num_workers,
        "device": device,
        "store": store,
    }
    train_x, test_x = encode(model, rows[train_split], **kwargs), encode(model, rows[eval_split], **kwargs)
    train_t, train_m = apply_policy(rows[train_split], policy)
    test_t, test_m = apply_policy(rows[eval_split], policy)
    scores = {
        "linear": linear_probe(train_x, train_t, train_m, test_x, c=c, seed=seed),
        "knn": knn_probe(train_x, train_t, train_m, test_x, k=k),
    }
    groups = {"All": np.ones(len(test_x), dtype=bool)}
    for name, (column, value) in GROUPS.items():
        member = (rows[eval_split][column] == value).to_numpy()
        if member.any() and not member.all():
            groups[name] = member
    auc = {
        method: {g: auc_by_pathology(test_t[m], p[m], test_m[m]) for g, m in groups.items()}
        for method, p in scores.items()
    }
    return {
        "train_split": train_split,
        "eval_split": eval_split,
        "n_train": len(train_x),
        "n_eval": len(test_x),
        "num_features": int(train_x.shape[1]),
        "k": k,
        "c": c,
        "policy": policy,
        "auc": auc,
        "pairs": pair_similarity(test_x, rows[eval_split]),
    }


def probe_run(
    run_dir: Path,
    data_root: Path | None = None,
    *,
    catalog: pd.DataFrame | None = None,
    split: str = "test",
    k: int = 10,
    c: float = 1.0,
    batch_size: int = 64,
    num_workers: int = 0,
    device: str | torch.device | None = None,
    store: str | Path | None = None,
) -> dict[str, Any]:
    """Probe a run's bundle (its encoder) on the data and write RUN/probe.json; returns the document.

    The splits are rebuilt with the run's own split settings (model.json `config.split`), and
    images are prepared as the bundle says (image_size, preprocessing); `store` is a prepared
    image store folder to read them from.
    """
    run_dir = Path(run_dir)
    model, meta = load_bundle(run_dir)
    if catalog is None:
        if data_root is None:
            raise ProbeError("probe_run needs data_root or a catalog")
        catalog = read_catalog(Path(data_root))
    config = meta.get("config") or {}
    catalog = assign_splits(catalog, **(config.get("split") or {}))
    document = probe(
        model,
        catalog,
        image_size=int(meta["image_size"]),
        preprocessing=meta.get("preprocessing", "imagenet"),
        policy=meta.get("policy", "ones"),
        eval_split=split,
        k=k,
        c=c,
        batch_size=batch_size,
        num_workers=num_workers,
        device=device,
        store=None if store is None else bundle_store(store, meta),
    )
    document = {
        "run": str(run_dir),
        "stage": meta.get("stage"),
        "objective": meta.get("objective", "supervised"),
        "backbone": meta["architecture"]["backbone"],
        **document,
    }
    folder = run_dir if run_dir.is_dir() else run_dir.parent
    write_json(folder / PROBE_FILE, document, newline=True)
    return document
