"""Use a bundle on images: preprocess, route each image to a head, flag what the model cannot judge.

`Predictor` is the one inference path shared by `chextrain predict`, `chextrain serve` and
`chextrain explain`. For every image it reports the head used, the router's P(photo), the domain
chosen, an out-of-distribution (OOD) check, and per pathology the probability and the decision
at the bundle's threshold for that head.

Guarding. An image is flagged, never silently scored, when
- its features lie far from those of the validation images: per group of features (channel
  means and spreads of a few encoder blocks, then the pooled encoder features) a Mahalanobis
  distance under a probabilistic-PCA model; the largest, relative to its typical value, is
  thresholded at the 99th percentile of validation images (`calibrate_ood`, stored in the
  bundle's meta under "ood"). Early blocks catch noise, blank pages and documents by texture
  and intensity; the last one catches content, as far as the encoder has learnt it; or
- the router cannot place it (P(photo) inside `ROUTER_BAND`).
A bundle without OOD calibration says so in every result (status "uncalibrated"); nothing is
computed silently in its place.

Test-time augmentation (TTA) averages a fixed set of small zooms and shifts. No flips: a chest
x-ray is not left-right symmetric (the heart lies left; cardiomegaly is judged on that side).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image
from torch import nn

from chextrain.data.transforms import as_preprocessing, preprocess, resize, to_grey
from chextrain.labels import NAME_OF, SLUGS
from chextrain.models.bundle import load_bundle
from chextrain.models.net import CXRNet

DOMAINS: tuple[str, ...] = ("auto", "digital", "photo")
RUNTIMES: tuple[str, ...] = ("torch", "onnx")
ROUTER_BAND: tuple[float, float] = (0.3, 0.7)  # P(photo) strictly inside: the router is unsure
OOD_METHOD = "ppca-mahalanobis"
# Blocks tapped for the OOD check, per backbone, in forward order (the last block is always in,
# through the pooled encoder features).
OOD_TAPS: dict[str, tuple[str, ...]] = {
    "tiny": ("features.block1", "features.block2"),
    "densenet121": ("features.transition1", "features.transition2", "features.transition3"),
    "resnet18": ("layer1", "layer2", "layer3"),
    "resnet50": ("layer1", "layer2", "layer3"),
    "efficientnet_b0": ("features.2", "features.4", "features.6"),
}
# TTA views (zoom, shift x, shift y; shifts as a fraction of the side): a few percent, as in
# the training augmentation; the first view is the image itself (OOD uses it alone).
TTA_VIEWS: tuple[tuple[float, float, float], ...] = (
    (1.0, 0.0, 0.0), (1.05, 0.0, 0.0), (0.95, 0.0, 0.0),
    (1.0, 0.03, 0.0), (1.0, -0.03, 0.0), (1.0, 0.0, 0.03), (1.0, 0.0, -0.03),
)


class PredictorError(ValueError):
    """A bundle, option or calibration that cannot be used as asked; the message says which."""


class Runtime(Protocol):
    """Runs the network on a batch: x float32 B x 3 x S x S -> probs, p_photo, features."""

    name: str

    def __call__(self, x: np.ndarray) -> dict[str, np.ndarray | None]: ...


def ood_taps(model: CXRNet) -> tuple[str, ...]:
    """Encoder blocks whose pooled statistics join the final features in the OOD check."""
    return tuple(n for n in OOD_TAPS.get(model.backbone_name, ()) if n in dict(model.encoder.named_modules()))


class ScoringNet(nn.Module):
    """CXRNet -> (probs B x heads x C, [p_photo B,] features B x D): what both runtimes run.

    features = per tap block the channel means and standard deviations over space, then the
    encoder's pooled features (B x F, the router's input): early blocks see texture and
    intensity (noise, blank pages), the last one what the image shows.
    """

    def __init__(self, model: CXRNet) -> None:
        super().__init__()
        self.model, self.taps = model, ood_taps(model)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        acts: list[torch.Tensor] = []
        hooks = [self.model.encoder.get_submodule(n).register_forward_hook(lambda m, i, o: acts.append(o))
                 for n in self.taps]
        try:
            out = self.model.forward_all(x)
        finally:
            for h in hooks:
                h.remove()
        stats = [torch.cat([a.mean(dim=(2, 3)), a.var(dim=(2, 3), correction=0).sqrt()], dim=1) for a in acts]
        features = torch.cat([*stats, out["features"]], dim=1)  # B x D
        probs = torch.sigmoid(out["logits"])  # B x heads x C
        if "router" in out:
            return probs, torch.sigmoid(out["router"]), features
        return probs, features


def feature_groups(model: CXRNet) -> list[tuple[str, int]]:
    """(name, width) of the consecutive groups of ScoringNet's features: taps, then `features`."""
    x = torch.zeros(1, 3, 32, 32)
    acts: list[int] = []
    hooks = [model.encoder.get_submodule(n).register_forward_hook(lambda m, i, o: acts.append(2 * o.shape[1]))
             for n in ood_taps(model)]
    try:
        with torch.inference_mode():
            model.eval().features(x)
    finally:
        for h in hooks:
            h.remove()
    return [*zip(ood_taps(model), acts, strict=True), ("features", model.num_features)]


class TorchRuntime:
    """Eager PyTorch on the CPU: probs B x heads x C, p_photo B (or None), features B x D."""

    name = "torch"

    def __init__(self, model: CXRNet) -> None:
        self.net = ScoringNet(model.eval()).eval()

    def __call__(self, x: np.ndarray) -> dict[str, np.ndarray | None]:
        with torch.inference_mode():
            out = [t.numpy() for t in self.net(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))]
        return {"probs": out[0], "p_photo": out[1] if len(out) == 3 else None, "features": out[-1]}


# --- out-of-distribution check -----------------------------------------------------------


def fit_ppca(features: np.ndarray, components: int) -> dict[str, Any]:
    """Fit a probabilistic-PCA Gaussian to features N x F: mean, top-k axes and variances.

    The F - k directions left over share one variance (their mean), so a feature vector that
    moves where validation images never did scores high even when F > N. Linear algebra runs
    in torch: numpy's OpenBLAS threads stall against torch's OpenMP threads once torch has run.
    """
    f = torch.as_tensor(np.asarray(features, dtype=np.float64))
    n, dim = f.shape
    k = max(1, min(components, n - 1, dim - 1))
    mean = f.mean(dim=0)
    _, s, vt = torch.linalg.svd(f - mean, full_matrices=False)
    eig = s**2 / max(n - 1, 1)  # variances along the axes, largest first
    floor = 1e-6 * float(eig.sum()) / dim + 1e-12  # keeps constant directions from dividing by zero
    residual = max(float(eig[k:].sum()) / (dim - k), floor)
    return {"mean": mean.tolist(), "axes": vt[:k].tolist(), "variances": eig[:k].clamp_min(floor).tolist(),
            "residual_variance": residual}


def ood_scores(features: np.ndarray, fit: Mapping[str, Any]) -> np.ndarray:
    """Squared Mahalanobis distance N of features N x F under a `fit_ppca` model, divided by F."""
    f = torch.as_tensor(np.asarray(features, dtype=np.float64))
    mean = torch.tensor(fit["mean"], dtype=torch.float64)  # F
    axes = torch.tensor(fit["axes"], dtype=torch.float64)  # k x F
    if f.ndim != 2 or f.shape[1] != mean.shape[0]:
        raise PredictorError(f"features have shape {tuple(f.shape)}; the OOD model expects "
                             f"N x {mean.shape[0]}")
    z = f - mean  # N x F
    proj = z @ axes.T  # N x k
    rest = ((z**2).sum(dim=1) - (proj**2).sum(dim=1)).clamp_min(0.0)
    inside = (proj**2 / torch.tensor(fit["variances"], dtype=torch.float64)).sum(dim=1)  # N
    return ((inside + rest / fit["residual_variance"]) / f.shape[1]).numpy()


def combined_scores(features: np.ndarray, groups: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """The OOD score N: over the feature groups, the largest distance relative to its typical value."""
    f = np.asarray(features, dtype=np.float64)
    width = sum(int(g["size"]) for g in groups)
    if f.ndim != 2 or f.shape[1] != width:
        raise PredictorError(f"features have shape {f.shape}; the OOD calibration expects N x {width}")
    edges = np.cumsum([0] + [int(g["size"]) for g in groups])
    per = [ood_scores(f[:, a:b], g) / g["scale"]
           for g, a, b in zip(groups, edges[:-1], edges[1:], strict=True)]  # groups x N
    return np.max(per, axis=0)


def _fit_groups(f: np.ndarray, sizes: Sequence[tuple[str, int]], components: int,
                folds: list[np.ndarray]) -> tuple[list[dict[str, Any]], np.ndarray]:
    """Per group a PPCA fit on all rows plus its scale (median out-of-fold score); the OOF scores."""
    groups, oof = [], []
    start = 0
    for name, size in sizes:
        g = f[:, start:start + size]
        start += size
        scores = np.empty(len(f))
        for part in folds:
            scores[part] = ood_scores(g[part], fit_ppca(np.delete(g, part, axis=0), components))
        scale = max(float(np.median(scores)), 1e-12)
        groups.append({"name": name, "size": size, "scale": scale, **fit_ppca(g, components)})
        oof.append(scores / scale)
    return groups, np.max(oof, axis=0)


def calibrate_ood(model: CXRNet, features: np.ndarray, *, quantile: float = 0.99, components: int = 16,
                  folds: int = 5, seed: int = 0) -> dict[str, Any]:
    """OOD calibration for a bundle's meta["ood"] from ScoringNet features N x D of validation images.

    Per feature group (each tap block, then the encoder features) a PPCA Gaussian; an image's
    score is its largest group distance divided by that group's median. The threshold is the
    `quantile` of out-of-fold scores (each image scored by fits made without it), so it is not
    biased low by images the fits have seen. Features: `image_features(model, images, size,
    preprocessing)` for decoded images, or `ood_features(model, x)` for a preprocessed batch,
    of every validation image (both domains) of the model being bundled.
    """
    f = np.asarray(features, dtype=np.float64)
    sizes = feature_groups(model)
    width = sum(s for _, s in sizes)
    if f.ndim != 2 or f.shape[1] != width:
        raise PredictorError(f"features have shape {f.shape}; expected N x {width} (ScoringNet features of "
                             f"the {model.backbone_name!r} model: {sizes})")
    if not np.isfinite(f).all():
        raise PredictorError("features contain NaN or inf")
    if not 0.5 <= quantile < 1.0:
        raise PredictorError(f"quantile must lie in [0.5, 1); got {quantile}")
    n, folds = f.shape[0], min(folds, f.shape[0])
    if n < 10 or folds < 2:
        raise PredictorError(f"OOD calibration needs >= 10 images and >= 2 folds; got {n} images, "
                             f"{folds} folds")
    parts = np.array_split(np.random.default_rng(seed).permutation(n), folds)
    groups, scores = _fit_groups(f, sizes, components, parts)
    return {"method": OOD_METHOD, "quantile": quantile, "threshold": float(np.quantile(scores, quantile)),
            "n": n, "router_band": list(ROUTER_BAND), "groups": groups}


def ood_features(model: CXRNet, x: torch.Tensor) -> np.ndarray:
    """ScoringNet features B x D (float64) of a preprocessed batch x B x 3 x S x S."""
    with torch.inference_mode():
        return ScoringNet(model.eval())(x)[-1].double().numpy()


def image_features(model: CXRNet, images: Sequence[np.ndarray], size: int,
                   preprocessing: str | Mapping[str, Any] = "imagenet", batch_size: int = 32) -> np.ndarray:
    """ScoringNet features N x D of decoded images (uint8 H x W), preprocessed as in the bundle."""
    out = []
    for i in range(0, len(images), batch_size):
        x = torch.stack([preprocess(im, size, preprocessing) for im in images[i:i + batch_size]])
        out.append(ood_features(model, x))  # B x D
    return np.concatenate(out) if out else np.zeros((0, sum(s for _, s in feature_groups(model))))


def _check_ood(ood: Any, model: CXRNet) -> dict[str, Any] | None:
    if ood is None:
        return None
    ok = isinstance(ood, Mapping) and ood.get("method") == OOD_METHOD and {"threshold", "groups"} <= set(ood)
    if not ok:
        raise PredictorError(f"bundle meta 'ood' must be a {OOD_METHOD!r} calibration with a threshold and "
                             "groups (made by chextrain.inference.calibrate_ood)")
    want = [list(g) for g in feature_groups(model)]
    got = [[g.get("name"), g.get("size")] for g in ood["groups"]]
    if got != want:
        raise PredictorError(f"bundle meta 'ood' was calibrated on feature groups {got}; this model has "
                             f"{want}")
    return dict(ood)


# --- the predictor -------------------------------------------------------------------------


def jitter(image: np.ndarray, zoom: float, dx: float, dy: float) -> np.ndarray:
    """uint8 H x W zoomed about its centre and shifted by (dx, dy) x its size; black borders."""
    if (zoom, dx, dy) == (1.0, 0.0, 0.0):
        return image
    h, w = image.shape
    cx, cy = w / 2.0, h / 2.0
    # PIL maps each output pixel to its input: x_in = (x_out - c - d) / zoom + c.
    coeffs = (1 / zoom, 0.0, cx - (cx + dx * w) / zoom, 0.0, 1 / zoom, cy - (cy + dy * h) / zoom)
    out = Image.fromarray(image).transform((w, h), Image.Transform.AFFINE, coeffs,
                                           resample=Image.Resampling.BILINEAR, fillcolor=0)
    return np.asarray(out)


class Predictor:
    """A bundle ready to answer images: the model, its meta, a runtime and the routing rule."""

    def __init__(self, model: CXRNet, meta: Mapping[str, Any], *, runtime: Runtime | None = None,
                 domain: str = "auto", name: str = "") -> None:
        if domain not in DOMAINS:
            raise PredictorError(f"domain {domain!r} is not one of {list(DOMAINS)}")
        self.model, self.meta, self.name = model.eval(), dict(meta), name
        self.runtime = runtime if runtime is not None else TorchRuntime(model)
        self.domain = domain
        self.size = int(meta["image_size"])
        self.preprocessing = as_preprocessing(meta.get("preprocessing", "imagenet"))
        self.thresholds: dict[str, dict[str, float]] = meta["thresholds"]
        self.domain_heads: dict[str, str] = meta["domain_heads"]
        self.single_head = self.domain_heads["digital"] == self.domain_heads["photo"]
        if domain == "auto" and not self.single_head and model.router is None:
            raise PredictorError(f"bundle {name or ''} has heads {model.head_names} but no router: pass "
                                 "domain 'digital' or 'photo' to choose the head")
        self.ood = _check_ood(meta.get("ood"), model)
        band = (self.ood or {}).get("router_band", ROUTER_BAND)
        self.router_band: tuple[float, float] = (float(band[0]), float(band[1]))
        self.lock = threading.RLock()  # one inference at a time: correct and not oversubscribed

    @classmethod
    def from_bundle(cls, path: str | Path, *, runtime: str = "torch", domain: str = "auto",
                    onnx_path: str | Path | None = None, threads: int | None = None) -> Predictor:
        """Load a bundle (folder or model.json); `runtime` onnx runs an exported ONNX file.

        onnx: `onnx_path`, else the bundle's model.onnx, else an export made in memory now. An
        ONNX file made from other weights than the bundle's is refused.
        """
        if runtime not in RUNTIMES:
            raise PredictorError(f"runtime {runtime!r} is not one of {list(RUNTIMES)}")
        path = Path(path)
        model, meta = load_bundle(path)
        run: Runtime | None = None
        if runtime == "onnx":
            from chextrain.export import onnx_runtime_for_bundle

            run = onnx_runtime_for_bundle(model, meta, path, onnx_path, threads=threads)
        bundle_dir = path if path.is_dir() else path.parent
        return cls(model, meta, runtime=run, domain=domain, name=bundle_dir.name)

    @property
    def pathology_names(self) -> list[str]:
        """The pathology names in the model's output order."""
        return list(self.meta["pathologies"])

    def inputs(self, image: np.ndarray, tta: bool = False) -> torch.Tensor:
        """uint8 H x W (or H x W x 3) -> network inputs V x 3 x S x S (V = 1, or the TTA views)."""
        small = resize(to_grey(image), self.size, self.preprocessing.resize)  # S x S, once
        views = TTA_VIEWS if tta else TTA_VIEWS[:1]
        return torch.stack([preprocess(jitter(small, *v), self.size, self.preprocessing) for v in views])

    def predict_images(self, images: Sequence[np.ndarray], names: Sequence[str] | None = None, *,
                       tta: bool = False, batch_size: int = 16,
                       domain: str | None = None) -> list[dict[str, Any]]:
        """One result dict per image (see `_result`), in order; `domain` overrides the default."""
        names = list(names) if names is not None else [f"image{i}" for i in range(len(images))]
        if len(names) != len(images):
            raise PredictorError(f"got {len(images)} images but {len(names)} names")
        if batch_size < 1:
            raise PredictorError(f"batch_size must be >= 1; got {batch_size}")
        domain = self.domain if domain is None else domain
        if domain not in DOMAINS:
            raise PredictorError(f"domain {domain!r} is not one of {list(DOMAINS)}")
        out: list[dict[str, Any]] = []
        for i in range(0, len(images), batch_size):
            chunk = images[i:i + batch_size]
            x = torch.cat([self.inputs(im, tta) for im in chunk]).numpy()  # (B*V) x 3 x S x S
            with self.lock:
                raw = self.runtime(x)
            v = len(TTA_VIEWS) if tta else 1
            probs = raw["probs"].reshape(len(chunk), v, *raw["probs"].shape[1:]).mean(axis=1)  # B x heads x C
            p_photo = None if raw["p_photo"] is None else raw["p_photo"].reshape(len(chunk), v).mean(axis=1)
            features = raw["features"].reshape(len(chunk), v, -1)[:, 0]  # B x D, the untouched view
            scores = combined_scores(features, self.ood["groups"]) if self.ood else None
            for j, name in enumerate(names[i:i + len(chunk)]):
                out.append(self._result(name, probs[j], None if p_photo is None else float(p_photo[j]),
                                        None if scores is None else float(scores[j]), domain, tta))
        return out

    def route(self, p_photo: float | None, domain: str) -> tuple[str | None, str, str]:
        """(domain, head, how it was chosen: forced | router | single-head)."""
        if domain != "auto":
            return domain, self.domain_heads[domain], "forced"
        if p_photo is None or self.single_head:
            chosen = None if p_photo is None else ("photo" if p_photo >= 0.5 else "digital")
            return chosen, self.domain_heads["digital"], "single-head"
        chosen = "photo" if p_photo >= 0.5 else "digital"
        return chosen, self.domain_heads[chosen], "router"

    def _result(self, name: str, probs: np.ndarray, p_photo: float | None, score: float | None,
                domain: str, tta: bool) -> dict[str, Any]:
        chosen, head, how = self.route(p_photo, domain)
        probs_h = probs[self.model.head_index(head)]  # C
        warnings = []
        unsure = how == "router" and self.router_band[0] < p_photo < self.router_band[1]
        if unsure:
            warnings.append(f"the router cannot tell a digital x-ray from a photo (P(photo) = {p_photo:.2f})")
        if self.ood is None:
            ood = {"status": "uncalibrated", "flag": None, "score": None, "threshold": None}
        else:
            flag = bool(score > self.ood["threshold"]) or not math.isfinite(score)
            ood = {"status": "out-of-distribution" if flag else "in-distribution", "flag": flag,
                   "score": score, "threshold": float(self.ood["threshold"])}
            if flag:
                warnings.append("this image does not look like the chest x-rays or photos of them the model "
                                f"was validated on (OOD score {score:.3g} > {self.ood['threshold']:.3g})")
        pathologies = {}
        for k, slug in enumerate(SLUGS):
            t = float(self.thresholds[head][slug])
            pathologies[slug] = {"name": NAME_OF[slug], "prob": float(probs_h[k]), "threshold": t,
                                 "positive": bool(probs_h[k] >= t)}
        return {"name": name, "head": head, "domain": chosen, "domain_source": how, "p_photo": p_photo,
                "router_uncertain": unsure, "ood": ood, "flagged": bool(warnings), "warnings": warnings,
                "tta": tta, "pathologies": pathologies}
