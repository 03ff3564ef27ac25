"""The `corners` objective: a small network that finds the radiograph's four corners in a photo.

PTRN's idea (the CheXphoto competition's winner): regress the corners, then warp the photo flat.
The network is the stage's backbone (default `tiny`) with one head of 9 outputs: the corners
TL, TR, BR, BL as fractions of the width and height (8, through a sigmoid spread over
rectify.CORNER_RANGE) and the logit of a confidence.

Training photos come from the stage's rows: every x-ray becomes a fresh simulated photo each
epoch (data/photo.py's recipes, which know where they drew the radiograph), and photos with
CheXphoto v1.1 corner labels (data/corners.py) train as they are. Loss: L1 on the normalised
corners plus BCE teaching the confidence whether the corners are right within the stage's
`corners.tolerance` (of the diagonal). `finish` measures the model against the classical finder
(rectify.classical_quad) on held-out simulated photos of the val x-rays and on the labelled
photos of the val/test splits, sets the confidence threshold (unless the stage gives one) to
the one that gives find_quad the smallest error on those simulated photos, and writes the
bundle rectify.CornerModel loads.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from chextrain.data.corners import PhotoCorners, catalog_corners
from chextrain.data.images import load_image
from chextrain.data.phone_grey import simulate_photo_grey_with_corners
from chextrain.data.photo import simulate_photo_with_corners
from chextrain.data.transforms import Preprocessing, to_network_input
from chextrain.models.bundle import save_bundle
from chextrain.models.net import CXRNet
from chextrain.rectify import (
    CLASSICAL_MIN_CONFIDENCE,
    CORNER_GRID,
    CORNER_HEAD,
    CORNER_HIDDEN,
    CORNER_RANGE,
    LEARNED_MIN_CONFIDENCE,
    CornerModel,
    classical_quad,
    corner_error,
    corner_input,
    decode_outputs,
    full_frame,
    quad_iou,
    to_corner_network,
)
from chextrain.training.loaders import TrainData
from chextrain.training.objectives.plan import LoaderSettings, Outcome, Plan
from chextrain.training.optim import make_optimizer
from chextrain.training.specs import CornersSpec, OptimizerSpec
from chextrain.training.stage import CornersStage


def photo_of(
    xray: np.ndarray,
    rng: np.random.Generator,
    spec: CornersSpec,
    *,
    side: int | None = None,
    grey: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """A simulated photo of `xray` and the x-ray's corners in it (TL, TR, BR, BL px, 4 x 2).

    The x-ray is first shrunk to `side` px on its longer side (the photo is made at about the
    size the network needs), padded onto a black 3:4 screen with probability `spec.canvas`, then
    photographed by a recipe and level drawn from `spec`; with probability `spec.plain` it stays
    as it is (corners = the frame). `grey` uses the grey phone recipe (fast; training), else the
    RGB one the demo writes. With probability `spec.negatives` the screen is blank: the corners
    are then NaN (no radiograph; the confidence must learn to say so).
    """
    if xray.ndim == 3:
        xray = np.asarray(Image.fromarray(xray).convert("L"))
    if side is not None and max(xray.shape) > side:
        k = side / max(xray.shape)
        size = (max(2, round(xray.shape[1] * k)), max(2, round(xray.shape[0] * k)))
        xray = np.asarray(Image.fromarray(xray).resize(size, Image.Resampling.BILINEAR))
    h, w = xray.shape
    if rng.random() < spec.plain:
        return xray, np.array([[0, 0], [w, 0], [w, h], [0, h]], np.float32)
    corners_known = True
    if rng.random() < spec.negatives:  # the screen shows nothing: there is no radiograph to find
        xray, corners_known = np.zeros_like(xray), False
    region, canvas = None, xray
    if rng.random() < spec.canvas:
        canvas = np.zeros((max(h, round(w * 4 / 3)), w), dtype=np.uint8)
        top = (canvas.shape[0] - h) // 2
        canvas[top : top + h] = xray
        region = (0, top, w, top + h)
    recipe = str(spec.recipes[int(rng.integers(len(spec.recipes)))])
    level = int(spec.levels[int(rng.integers(len(spec.levels)))])
    if grey:
        photo, corners = simulate_photo_grey_with_corners(canvas, recipe, level, rng, region=region)
    else:
        photo, corners = simulate_photo_with_corners(canvas, recipe, level, rng, region=region)
    return photo, corners if corners_known else np.full((4, 2), np.nan, np.float32)


class CornerPhotos(Dataset):
    """Training photos with their corners: {"image": uint8 1 x S x S, "corners": float32 8, "index"}.

    Rows whose path is in `labelled` are photos with known corners, read as they are; the other
    rows are x-rays, photographed afresh for each (seed, epoch, index).
    """

    def __init__(
        self,
        paths: list[str],
        labelled: dict[str, PhotoCorners],
        spec: CornersSpec,
        image_size: int,
        seed: int,
    ) -> None:
        self.paths, self.labelled, self.spec = paths, labelled, spec
        self.image_size, self.seed = image_size, seed

    def __len__(self) -> int:
        return len(self.paths)

    def sample(self, index: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(network input uint8 S x S, corners as fractions of the side, 4 x 2 float32)."""
        path = self.paths[index]
        image = load_image(path)
        if path in self.labelled:
            known = self.labelled[path]
            corners = known.corners * np.array(
                [image.shape[1] / known.width, image.shape[0] / known.height], np.float32
            )
        else:
            rng = np.random.default_rng([self.seed, epoch, index])
            image, corners = photo_of(image, rng, self.spec, side=2 * self.image_size)
        h, w = image.shape[:2]
        return corner_input(image, self.image_size), (corners / np.array([w, h], np.float32)).astype(
            np.float32
        )

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        image, corners = self.sample(index, epoch)
        return {
            "image": torch.from_numpy(image)[None],  # 1 x S x S
            "corners": torch.from_numpy(corners.reshape(8)),  # 8
            "index": index,
        }


def corner_losses(outputs: torch.Tensor, target: torch.Tensor, tolerance: float) -> dict[str, torch.Tensor]:
    """L1 of the corners, the confidence's BCE and the batch's mean corner error.

    outputs: B x 9 logits; target: B x 8 corners as fractions of the side, NaN where the photo
    shows no radiograph (no corner loss; the confidence must be 0). The confidence learns whether
    each sample's mean corner distance (normalised, / sqrt 2: a fraction of the diagonal of the
    unit square) is within `tolerance`.
    """
    corners, _ = decode_outputs(outputs)  # B x 4 x 2
    target = target.float().reshape(-1, 4, 2)
    known = torch.isfinite(target).flatten(1).all(dim=1)  # B
    target = torch.where(known[:, None, None], target, corners.detach())  # unknown: no corner loss
    l1 = (corners - target).abs().mean(dim=(1, 2))[known].sum() / known.sum().clamp_min(1)
    error = (corners - target).norm(dim=2).mean(dim=1).detach() / math.sqrt(2.0)  # B
    right = ((error < tolerance) & known).float()
    bce = F.binary_cross_entropy_with_logits(outputs[:, 8].float(), right)
    mean_error = error[known].mean() if bool(known.any()) else error.sum() * 0.0
    return {"loss": l1 + 0.1 * bce, "l1": l1, "bce": bce, "error": mean_error}


class CornersModule(L.LightningModule):
    """Trains the corner network: images uint8 B x 1 x S x S -> network input on the device -> B x 9."""

    def __init__(
        self, model: CXRNet, *, optimizer: OptimizerSpec, preprocessing: Preprocessing, tolerance: float
    ) -> None:
        super().__init__()
        self.model = model
        self.optimizer_spec = optimizer
        self.preprocessing = preprocessing
        self.tolerance = tolerance
        self.last: dict[str, float] = {}

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        x = to_network_input(batch["image"], self.preprocessing)  # B x 3 x S x S
        out = corner_losses(self.model(x, CORNER_HEAD), batch["corners"], self.tolerance)
        n = len(batch["index"])
        for key in ("loss", "l1", "bce", "error"):
            self.log(f"train/{key}", out[key], on_step=True, prog_bar=key == "loss", batch_size=n)
        self.last = {k: float(v.detach()) for k, v in out.items()}
        return out["loss"]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return make_optimizer(list(self.model.parameters()), self.optimizer_spec)


def held_out_photos(
    paths: list[str], spec: CornersSpec, n: int, seed: int, side: int = 320, blank: bool = False
) -> list[tuple[np.ndarray, np.ndarray]]:
    """`n` simulated RGB photos (the demo's recipe: never seen in training) of the x-rays at
    `paths`, cycling through them, each with its true corners; fixed by `seed`. `blank`: every
    screen shows nothing instead (corners NaN), to see whether the confidence says so."""
    spec = spec.model_copy(update={"negatives": 1.0 if blank else 0.0, "plain": 0.0 if blank else spec.plain})
    out = []
    for i in range(n if paths else 0):
        rng = np.random.default_rng([seed, 7919, i])
        out.append(photo_of(load_image(paths[i % len(paths)]), rng, spec, side=side, grey=False))
    return out


def compare(
    photos: list[tuple[np.ndarray, np.ndarray]], predicted: np.ndarray, confidence: np.ndarray
) -> tuple[dict[str, Any], np.ndarray]:
    """Mean corner error (fraction of the diagonal) and IoU of `predicted` (N x 4 x 2 px) and of
    the classical finder on the same photos, side by side; and per photo (N x 5) the learned
    error, its confidence, the classical error, its confidence and the whole frame's error (what
    choose_threshold weighs)."""
    rows: dict[str, list[float]] = {"learned_error": [], "learned_iou": [], "classical_error": []}
    rows["classical_iou"] = []
    per_photo = []
    for (photo, true), found, sure in zip(photos, predicted, confidence, strict=True):
        h, w = photo.shape[:2]
        classical = classical_quad(photo)
        rows["learned_error"].append(corner_error(found, true, w, h))
        rows["learned_iou"].append(quad_iou(found, true))
        rows["classical_error"].append(corner_error(classical.corners, true, w, h))
        rows["classical_iou"].append(quad_iou(classical.corners, true))
        frame = corner_error(full_frame(w, h), true, w, h)
        per_photo.append(
            [rows["learned_error"][-1], float(sure), rows["classical_error"][-1], classical.confidence, frame]
        )
    summary: dict[str, Any] = {k: float(np.mean(v)) if v else float("nan") for k, v in rows.items()}
    summary["n"] = len(photos)
    return summary, np.asarray(per_photo, dtype=np.float64).reshape(-1, 5)


def choose_threshold(per_photo: np.ndarray, slack: float = 0.1) -> tuple[float, float]:
    """The learned model's min_confidence for find_quad (learned -> classical -> whole frame): the
    highest threshold (of 0, 0.05, ..., 0.95) whose mean corner error on these photos (compare's
    N x 5) is within `slack` (relative) of the smallest; returns (threshold, its error).

    The slack keeps the gate as strict as the corners allow: a photo the model is unsure of (a
    blank screen, no radiograph) then falls back, at little cost on the photos it knows.
    """
    learned, sure, classical, classical_sure, frame = per_photo.T
    fallback = np.where(classical_sure >= CLASSICAL_MIN_CONFIDENCE, classical, frame)
    thresholds = np.round(np.arange(0.0, 0.96, 0.05), 2)
    errors = [float(np.where(sure >= t, learned, fallback).mean()) for t in thresholds]
    k = max(i for i, e in enumerate(errors) if e <= min(errors) * (1 + slack) + 1e-12)
    return float(thresholds[k]), errors[k]


class Corners:
    """The `corners` objective for the stage lifecycle (see training/objectives/__init__.py)."""

    load_heads = False  # an init brings its encoder; the corner head starts fresh unless resumed

    def plan(
        self,
        stage: CornersStage,
        model: CXRNet,
        catalog: pd.DataFrame,
        train_rows: pd.DataFrame,
        loader: LoaderSettings,
    ) -> Plan:
        """CornersModule over the x-rays of the train rows (photographed afresh) and the photos
        among them with v1.1 corner labels; other photos (corners unknown) are left out."""
        to_corner_network(model)
        labelled = catalog_corners(train_rows) if stage.corners.labelled else {}
        keep = (train_rows["domain"] == "digital") | train_rows["path"].isin(list(labelled))
        paths = train_rows.loc[keep, "path"].astype(str).tolist()
        module = CornersModule(
            model,
            optimizer=stage.optimizer,
            preprocessing=stage.preprocessing,
            tolerance=stage.corners.tolerance,
        )
        data = TrainData(
            CornerPhotos(paths, labelled, stage.corners, stage.image_size, stage.seed),
            batch_size=stage.batch_size,
            seed=stage.seed,
            num_workers=loader.num_workers,
            pin_memory=loader.pin_memory,
        )
        info = {"xrays": int(keep.sum()) - len(labelled), "labelled_photos": len(labelled)}
        info["left_out"] = int((~keep).sum())
        return Plan(module, data, info=info)

    def select_weights(self, stage: CornersStage, plan: Plan, out_dir: Path) -> str:
        """The last weights (there is no validation loop)."""
        return "last"

    def finish(
        self,
        stage: CornersStage,
        model: CXRNet,
        plan: Plan,
        catalog: pd.DataFrame,
        out_dir: Path,
        meta: dict[str, Any],
    ) -> Outcome:
        """Measure learned against classical (held-out simulated photos of the val x-rays; the
        labelled photos of val and test), then write the bundle."""
        model.eval()
        bundle_meta = {
            "objective": "corners",
            "image_size": meta["image_size"],
            "preprocessing": meta["preprocessing"],
            "stage": meta["stage"],
            "label": meta["label"],
            "config": meta["config"],
            "config_hash": meta["config_hash"],
            "training": {**meta["training"], **plan.info},
            "corners": {
                "outputs": "TL, TR, BR, BL (x, y) as fractions of width and height, then the confidence",
                "corner_range": list(CORNER_RANGE),
                "min_confidence": stage.corners.min_confidence,
                "tolerance": stage.corners.tolerance,
                "grid": CORNER_GRID,
                "hidden": CORNER_HIDDEN,
            },
        }
        finder = CornerModel(model, bundle_meta)
        metrics: dict[str, Any] = {}
        val = catalog.loc[(catalog["split"] == "val") & (catalog["domain"] == "digital"), "path"]
        spec, xrays = stage.corners, val.astype(str).tolist()
        photos = held_out_photos(xrays, spec, spec.eval_photos, stage.seed)
        threshold = stage.corners.min_confidence
        if photos:
            corners, sure = finder.predict_batch([p for p, _ in photos])
            metrics["val/simulated"], per_photo = compare(photos, corners, sure)
            chosen, error = choose_threshold(per_photo)
            metrics["val/simulated"]["find_quad_error"] = error
            if threshold is None:
                threshold = chosen
        threshold = LEARNED_MIN_CONFIDENCE if threshold is None else threshold
        bundle_meta["corners"]["min_confidence"] = finder.min_confidence = threshold
        blank = held_out_photos(xrays, spec, spec.eval_photos // 4, stage.seed, blank=True)
        if blank:
            _, sure = finder.predict_batch([p for p, _ in blank])
            metrics["val/simulated"]["blank_screens_doubted"] = float((sure < threshold).mean())
        for split in ("val", "test"):
            rows = catalog.loc[catalog["split"] == split]
            labelled = catalog_corners(rows) if stage.corners.labelled else {}
            if labelled:
                real = [(load_image(p), known.corners) for p, known in labelled.items()]
                corners, sure = finder.predict_batch([p for p, _ in real])
                metrics[f"{split}/labelled"] = compare(real, corners, sure)[0]
        bundle_meta["metrics"] = metrics
        save_bundle(model, out_dir, bundle_meta)
        last = plan.module.last if isinstance(plan.module, CornersModule) else {}
        return Outcome(metrics, {"corners": last, **plan.info})


CORNERS = Corners()
