"""Out-of-distribution (OOD) check: the scoring network, its features, their calibration and score.

`ScoringNet` is what every runtime runs (PyTorch, the ONNX export, batch evaluation): all heads'
probabilities, the router's P(photo) and the OOD features of a batch, in one forward pass.
`run_batch` is the one way a network is run on a batch outside training: on the device and in the
dtype of its parameters, under autocast on CUDA, with float32 numpy outputs on the CPU. A uint8
batch (what loader workers hand over) becomes the network input there, on the device.

The check. Per group of features (channel means and spreads of a few encoder blocks, then the
pooled encoder features) a Mahalanobis distance under a probabilistic-PCA model; an image's score
is the largest, relative to its typical value, and it is flagged above the 99th percentile of
validation images (`calibrate_ood`, stored in a bundle's meta under "ood"). Early blocks catch
noise, blank pages and documents by texture and intensity; the last one catches content, as far
as the encoder has learnt it.

This module imports nothing of inference, export, serving or training: they import it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from chextrain.data.transforms import Preprocessing, preprocess, to_network_input
from chextrain.errors import ChextrainError
from chextrain.models.net import CXRNet

OOD_METHOD = "ppca-mahalanobis"
ROUTER_BAND: tuple[float, float] = (0.3, 0.7)  # P(photo) strictly inside: the router is unsure
# Blocks tapped for the OOD check, per backbone, in forward order (the last block is always in,
# through the pooled encoder features).
OOD_TAPS: dict[str, tuple[str, ...]] = {
    "tiny": ("features.block1", "features.block2"),
    "densenet121": ("features.transition1", "features.transition2", "features.transition3"),
    "resnet18": ("layer1", "layer2", "layer3"),
    "resnet50": ("layer1", "layer2", "layer3"),
    "efficientnet_b0": ("features.2", "features.4", "features.6"),
}


class OODError(ChextrainError):
    """OOD features or a calibration that cannot be used as asked; the message says which."""


def run_batch(
    net: nn.Module, x: torch.Tensor, preprocessing: str | Preprocessing | Mapping[str, Any] | None = None
) -> tuple[np.ndarray, ...]:
    """`net(x)` where the net lives; every output as float32 numpy on the CPU.

    The device and dtype come from the net's parameters; x moves there (without blocking when
    it is in pinned memory). A uint8 x (B x 1 x S x S, as loaders hand over) is made the network
    input there with `preprocessing` (transforms.to_network_input). On CUDA the forward runs
    under autocast (bf16 where supported, else fp16); on the CPU exactly as written, so CPU
    results are bit for bit those of a plain call. The caller sets the mode (eval for inference).
    """
    param = next(net.parameters())
    x = x.to(param.device, non_blocking=x.is_pinned())
    if x.dtype == torch.uint8:
        if preprocessing is None:
            raise OODError("run_batch got uint8 images without the preprocessing that makes them the input")
        x = to_network_input(x, preprocessing)
    x = x.to(dtype=param.dtype)
    amp: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    if param.device.type == "cuda":
        amp = torch.autocast(
            "cuda", dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        )
    with torch.inference_mode(), amp:
        out = net(x)
    outs = (out,) if isinstance(out, torch.Tensor) else tuple(out)
    return tuple(t.float().cpu().numpy() for t in outs)


def ood_taps(model: CXRNet) -> tuple[str, ...]:
    """Encoder blocks whose pooled statistics join the final features in the OOD check."""
    return tuple(n for n in OOD_TAPS.get(model.backbone_name, ()) if n in dict(model.encoder.named_modules()))


def _fp32(t: torch.Tensor) -> torch.Tensor:
    # A Python-level test, so float32 graphs (CPU, the ONNX export) are traced unchanged.
    return t if t.dtype == torch.float32 else t.float()


class ScoringNet(nn.Module):
    """CXRNet -> (probs B x heads x C, [p_photo B,] features B x D): what every runtime runs.

    features = per tap block the channel means and standard deviations over space, then the
    encoder's pooled features (B x F, the router's input): early blocks see texture and
    intensity (noise, blank pages), the last one what the image shows. Under autocast they are
    taken in float32. With `logits=True` the heads' and router's logits come out instead of
    their sigmoids (batch evaluation picks each row's head first, then applies the sigmoid).
    """

    def __init__(self, model: CXRNet, *, logits: bool = False) -> None:
        super().__init__()
        self.model, self.taps, self.logits = model, ood_taps(model), logits

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        acts: list[torch.Tensor] = []
        hooks = [
            self.model.encoder.get_submodule(n).register_forward_hook(lambda m, i, o: acts.append(o))
            for n in self.taps
        ]
        try:
            out = self.model.forward_all(x)
        finally:
            for h in hooks:
                h.remove()
        taps = [_fp32(a) for a in acts]  # B x C_t x H_t x W_t each
        stats = [torch.cat([a.mean(dim=(2, 3)), a.var(dim=(2, 3), correction=0).sqrt()], dim=1) for a in taps]
        features = torch.cat([*stats, _fp32(out["features"])], dim=1)  # B x D
        scores = [_fp32(out["logits"])]  # B x heads x C
        if "router" in out:
            scores.append(_fp32(out["router"]))  # B
        if not self.logits:
            scores = [torch.sigmoid(s) for s in scores]
        return (*scores, features)


def feature_groups(model: CXRNet) -> list[tuple[str, int]]:
    """(name, width) of the consecutive groups of ScoringNet's features: taps, then `features`."""
    param = next(model.parameters())
    x = torch.zeros(1, 3, 32, 32, device=param.device, dtype=param.dtype)
    acts: list[int] = []
    hooks = [
        model.encoder.get_submodule(n).register_forward_hook(lambda m, i, o: acts.append(2 * o.shape[1]))
        for n in ood_taps(model)
    ]
    try:
        with torch.inference_mode():
            model.eval().features(x)
    finally:
        for h in hooks:
            h.remove()
    return [*zip(ood_taps(model), acts, strict=True), ("features", model.num_features)]


def ood_features(model: CXRNet, x: torch.Tensor) -> np.ndarray:
    """ScoringNet features B x D (float64) of a preprocessed batch x B x 3 x S x S."""
    return run_batch(ScoringNet(model.eval()), x)[-1].astype(np.float64)


def image_features(
    model: CXRNet,
    images: Sequence[np.ndarray],
    size: int,
    preprocessing: str | Mapping[str, Any] = "imagenet",
    batch_size: int = 32,
) -> np.ndarray:
    """ScoringNet features N x D of decoded images (uint8 H x W), preprocessed as in the bundle."""
    out = []
    for i in range(0, len(images), batch_size):
        x = torch.stack([preprocess(im, size, preprocessing) for im in images[i : i + batch_size]])
        out.append(ood_features(model, x))  # B x D
    return np.concatenate(out) if out else np.zeros((0, sum(s for _, s in feature_groups(model))))


# --- the Mahalanobis score ------------------------------------------------------------------


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
    return {
        "mean": mean.tolist(),
        "axes": vt[:k].tolist(),
        "variances": eig[:k].clamp_min(floor).tolist(),
        "residual_variance": residual,
    }


def ood_scores(features: np.ndarray, fit: Mapping[str, Any]) -> np.ndarray:
    """Squared Mahalanobis distance N of features N x F under a `fit_ppca` model, divided by F."""
    f = torch.as_tensor(np.asarray(features, dtype=np.float64))
    mean = torch.tensor(fit["mean"], dtype=torch.float64)  # F
    axes = torch.tensor(fit["axes"], dtype=torch.float64)  # k x F
    if f.ndim != 2 or f.shape[1] != mean.shape[0]:
        raise OODError(f"features have shape {tuple(f.shape)}; the OOD model expects N x {mean.shape[0]}")
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
        raise OODError(f"features have shape {f.shape}; the OOD calibration expects N x {width}")
    edges = np.cumsum([0] + [int(g["size"]) for g in groups])
    per = [
        ood_scores(f[:, a:b], g) / g["scale"] for g, a, b in zip(groups, edges[:-1], edges[1:], strict=True)
    ]  # groups x N
    return np.max(per, axis=0)


def _fit_groups(
    f: np.ndarray, sizes: Sequence[tuple[str, int]], components: int, folds: list[np.ndarray]
) -> tuple[list[dict[str, Any]], np.ndarray]:
    """Per group a PPCA fit on all rows plus its scale (median out-of-fold score); the OOF scores."""
    groups, oof = [], []
    start = 0
    for name, size in sizes:
        g = f[:, start : start + size]
        start += size
        scores = np.empty(len(f))
        for part in folds:
            scores[part] = ood_scores(g[part], fit_ppca(np.delete(g, part, axis=0), components))
        scale = max(float(np.median(scores)), 1e-12)
        groups.append({"name": name, "size": size, "scale": scale, **fit_ppca(g, components)})
        oof.append(scores / scale)
    return groups, np.max(oof, axis=0)


def calibrate_ood(
    model: CXRNet,
    features: np.ndarray,
    *,
    quantile: float = 0.99,
    components: int = 16,
    folds: int = 5,
    seed: int = 0,
) -> dict[str, Any]:
    """OOD calibration for a bundle's meta["ood"] from ScoringNet features N x D of validation images.

    Per feature group (each tap block, then the encoder features) a PPCA Gaussian; an image's
    score is its largest group distance divided by that group's median. The threshold is the
    `quantile` of out-of-fold scores (each image scored by fits made without it), so it is not
    biased low by images the fits have seen. Features: the `features` of
    `evaluation.predict.predict_rows(..., ood_features=True)` over the validation split,
    `image_features(model, images, size, preprocessing)` for decoded images, or
    `ood_features(model, x)` for a preprocessed batch, of every validation image (both domains)
    of the model being bundled.
    """
    f = np.asarray(features, dtype=np.float64)
    sizes = feature_groups(model)
    width = sum(s for _, s in sizes)
    if f.ndim != 2 or f.shape[1] != width:
        raise OODError(
            f"features have shape {f.shape}; expected N x {width} (ScoringNet features of "
            f"the {model.backbone_name!r} model: {sizes})"
        )
    if not np.isfinite(f).all():
        raise OODError("features contain NaN or inf")
    if not 0.5 <= quantile < 1.0:
        raise OODError(f"quantile must lie in [0.5, 1); got {quantile}")
    n, folds = f.shape[0], min(folds, f.shape[0])
    if n < 10 or folds < 2:
        raise OODError(f"OOD calibration needs >= 10 images and >= 2 folds; got {n} images, {folds} folds")
    parts = np.array_split(np.random.default_rng(seed).permutation(n), folds)
    groups, scores = _fit_groups(f, sizes, components, parts)
    return {
        "method": OOD_METHOD,
        "quantile": quantile,
        "threshold": float(np.quantile(scores, quantile)),
        "n": n,
        "router_band": list(ROUTER_BAND),
        "groups": groups,
    }


def check_calibration(ood: Any, model: CXRNet) -> dict[str, Any] | None:
    """A bundle's meta["ood"] checked against the model (None stays None: uncalibrated)."""
    if ood is None:
        return None
    ok = isinstance(ood, Mapping) and ood.get("method") == OOD_METHOD and {"threshold", "groups"} <= set(ood)
    if not ok:
        raise OODError(
            f"bundle meta 'ood' must be a {OOD_METHOD!r} calibration with a threshold and "
            "groups (made by chextrain.ood.calibrate_ood)"
        )
    want = [list(g) for g in feature_groups(model)]
    got = [[g.get("name"), g.get("size")] for g in ood["groups"]]
    if got != want:
        raise OODError(f"bundle meta 'ood' was calibrated on feature groups {got}; this model has {want}")
    return dict(ood)
