"""Saliency maps (captum): vanilla gradients, the paper's method, and Grad-CAM; overlays and grids.

Vanilla gradients: |d logit_k / d pixel| for each pathology k, one backward pass per
pathology with nothing carried over. The paper's code called backward() once per pathology on
the same input and read `x.grad`, which accumulates, so its map for pathology k was the sum of
the gradients of pathologies 1..k. captum's `Saliency` takes each gradient with
`torch.autograd.grad`, which never accumulates; `test_saliency` checks that the map of
pathology k equals the map computed alone. The input is one grey image copied into three
channels, so the gradient with respect to the grey pixel is the sum over channels.

Grad-CAM: captum's `LayerGradCam` on the deepest block of the encoder whose output still has at
least MIN_CAM_CELLS x MIN_CAM_CELLS cells at the input size (`gradcam_layer`): the last block
(DenseNet-121: `denseblock4`, 10 x 10 at 320 px) where the image is large enough, an earlier one
where it is not (`denseblock2` at 64 px, where `denseblock4` would be 2 x 2: a few coarse bands),
ReLU-ed and upsampled bilinearly to the input size. Where no block has that many cells (a tiny
input), `explain_maps` uses vanilla gradients instead and says so. A map that is zero everywhere
(Grad-CAM keeps only evidence FOR the finding) gets a note saying why it is blank (`blank_notes`).

Both explain logits (before the sigmoid), whose gradients do not vanish for confident
predictions. Maps are returned raw (float32, >= 0) and normalised to [0, 1] only for display.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
import torch
from captum.attr import LayerAttribution, LayerGradCam, Saliency
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from chextrain.errors import ChextrainError
from chextrain.labels import PATHOLOGIES, SLUGS
from chextrain.models.net import CXRNet

METHODS: tuple[str, ...] = ("gradient", "gradcam")
MIN_CAM_CELLS = 8  # Grad-CAM needs at least this many cells a side to draw more than coarse bands


class SaliencyError(ChextrainError):
    """Bad arguments to a saliency function (method, targets, shapes)."""


def _head_forward(model: CXRNet, head: str):
    model.head_index(head)  # a clear error for an unknown head
    return lambda x: model(x, head)  # B x C logits


def _targets(model: CXRNet, targets: Sequence[int] | None) -> list[int]:
    targets = list(range(model.num_classes)) if targets is None else list(targets)
    bad = [t for t in targets if not 0 <= int(t) < model.num_classes]
    if bad:
        raise SaliencyError(f"targets {bad} out of range: the model has {model.num_classes} outputs")
    return [int(t) for t in targets]


def _check_input(x: torch.Tensor) -> torch.Tensor:
    if x.ndim != 4 or x.shape[1] != 3:
        raise SaliencyError(f"expected images B x 3 x S x S; got shape {tuple(x.shape)}")
    return x.detach().clone().float()


def vanilla_gradients(
    model: CXRNet, x: torch.Tensor, head: str, targets: Sequence[int] | None = None
) -> np.ndarray:
    """|d logit_k / d grey pixel| for x B x 3 x S x S -> float32 B x T x S x S (one pass per target)."""
    x, model = _check_input(x).requires_grad_(True), model.eval()
    saliency = Saliency(_head_forward(model, head))
    maps = []
    for k in _targets(model, targets):
        grad = saliency.attribute(x, target=k, abs=False)  # B x 3 x S x S, a fresh gradient
        maps.append(grad.sum(dim=1).abs())  # B x S x S
    return torch.stack(maps, dim=1).detach().numpy().astype(np.float32)


def gradcam_layer(model: CXRNet, size: int) -> tuple[str, tuple[int, int]] | None:
    """(name, cells h x w) of the deepest encoder block, up to the last one, whose output has at least
    MIN_CAM_CELLS cells a side for S x S inputs; None if none has (use gradients then).

    The candidates are the last block and the modules before it in the same parent (DenseNet's
    denseblocks and transitions, ResNet's layers, the tiny net's blocks); their output sizes come
    from one forward pass of a blank image.
    """
    last = model.encoder.last_block[0]
    parent_name = last.rpartition(".")[0]
    parent = model.encoder.get_submodule(parent_name) if parent_name else model.encoder
    names = [f"{parent_name}.{n}" if parent_name else n for n, _ in parent.named_children()]
    names = names[: names.index(last) + 1]
    cells: dict[str, tuple[int, int]] = {}

    def record(name: str):
        def hook(module: torch.nn.Module, inputs: object, output: object) -> None:
            if isinstance(output, torch.Tensor) and output.ndim == 4:
                cells[name] = (int(output.shape[-2]), int(output.shape[-1]))

        return hook

    hooks = [model.encoder.get_submodule(n).register_forward_hook(record(n)) for n in names]
    param = next(model.parameters())
    try:
        with torch.no_grad():
            model.eval().features(torch.zeros(1, 3, size, size, device=param.device, dtype=param.dtype))
    finally:
        for h in hooks:
            h.remove()
    for name in reversed(names):
        if name in cells and min(cells[name]) >= MIN_CAM_CELLS:
            return name, cells[name]
    return None


def grad_cam(
    model: CXRNet, x: torch.Tensor, head: str, targets: Sequence[int] | None = None, layer: str | None = None
) -> np.ndarray:
    """Grad-CAM for x B x 3 x S x S -> float32 B x T x S x S (>= 0), on `layer` (a name in the encoder;
    None: `gradcam_layer`'s choice, else the last block)."""
    x, model = _check_input(x), model.eval()
    if layer is None:
        chosen = gradcam_layer(model, int(x.shape[-1]))
        layer = chosen[0] if chosen else model.encoder.last_block[0]
    layer = model.encoder.get_submodule(layer)
    cam = LayerGradCam(_head_forward(model, head), layer)
    maps = []
    for k in _targets(model, targets):
        a = cam.attribute(x, target=k, relu_attributions=True)  # B x 1 x h x w
        a = LayerAttribution.interpolate(a, tuple(x.shape[-2:]), "bilinear")  # B x 1 x S x S
        maps.append(a[:, 0].clamp_min(0))
    return torch.stack(maps, dim=1).detach().numpy().astype(np.float32)


def saliency_maps(
    model: CXRNet, x: torch.Tensor, head: str, method: str = "gradcam", targets: Sequence[int] | None = None
) -> np.ndarray:
    """Maps B x T x S x S by `method` (gradient | gradcam); see `explain_maps`."""
    return explain_maps(model, x, head, method, targets)[0]


def explain_maps(
    model: CXRNet, x: torch.Tensor, head: str, method: str = "gradcam", targets: Sequence[int] | None = None
) -> tuple[np.ndarray, dict[str, object]]:
    """(maps B x T x S x S, how they were made: {"method", "layer", "cells", "note"}).

    gradcam runs on `gradcam_layer`'s block; where the input is too small for any block to have
    MIN_CAM_CELLS cells a side, vanilla gradients are used instead and the note says so.
    """
    if method not in METHODS:
        raise SaliencyError(f"unknown saliency method {method!r}; expected one of {list(METHODS)}")
    x = _check_input(x)
    if method == "gradcam":
        chosen = gradcam_layer(model, int(x.shape[-1]))
        if chosen is not None:
            name, cells = chosen
            info = {"method": "gradcam", "layer": name, "cells": list(cells), "note": None}
            return grad_cam(model, x, head, targets, layer=name), info
        note = (
            f"gradient maps: at {x.shape[-1]} px no block of the encoder keeps "
            f"{MIN_CAM_CELLS} x {MIN_CAM_CELLS} cells for Grad-CAM"
        )
        return vanilla_gradients(model, x, head, targets), {
            "method": "gradient",
            "layer": None,
            "cells": None,
            "note": note,
        }
    return vanilla_gradients(model, x, head, targets), {
        "method": "gradient",
        "layer": None,
        "cells": None,
        "note": None,
    }


def blank_notes(maps: np.ndarray, method: str) -> list[str | None]:
    """Per map T x S x S: why it is blank (zero or not finite everywhere), or None for a map with content."""
    why = {
        "gradcam": "blank: no region raised this score (Grad-CAM shows only evidence for the finding)",
        "gradient": "blank: the score does not change with any pixel (the output is saturated)",
    }[method]
    return [None if np.isfinite(m).all() and float(np.max(m)) > 0 else why for m in maps]


def normalise(sal: np.ndarray) -> np.ndarray:
    """A map scaled to [0, 1] by its own maximum (all zeros stays zeros)."""
    sal = np.nan_to_num(np.asarray(sal, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    sal = sal - sal.min()
    top = float(sal.max())
    return sal / top if top > 0 else sal


def map_to_image(sal: np.ndarray, shape: tuple[int, int], resize: str = "stretch") -> np.ndarray:
    """A map S x S of the network input back onto an image H x W (undoing `stretch` or `pad`)."""
    h, w = shape
    s = sal.shape[0]
    if resize == "pad":  # the content sat centred in the S x S square with black borders
        scale = s / max(h, w)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        top, left = (s - nh) // 2, (s - nw) // 2
        sal = sal[top : top + nh, left : left + nw]
    img = Image.fromarray(np.ascontiguousarray(sal, dtype=np.float32))
    return np.asarray(img.resize((w, h), Image.Resampling.BILINEAR))


def overlay(image: np.ndarray, sal: np.ndarray, alpha: float = 0.45, resize: str = "stretch") -> np.ndarray:
    """Grey image uint8 H x W + map S x S -> uint8 H x W x 3 (jet colours blended by map strength)."""
    heat = normalise(map_to_image(normalise(sal), image.shape[:2], resize))  # H x W in [0, 1]
    colours = matplotlib.colormaps["jet"](heat)[..., :3]  # H x W x 3
    grey = np.repeat(image[..., None].astype(np.float32) / 255.0, 3, axis=2)
    weight = alpha * heat[..., None]
    return np.rint((grey * (1 - weight) + colours * weight) * 255).clip(0, 255).astype(np.uint8)


def png_bytes(rgb: np.ndarray) -> bytes:
    """uint8 H x W x 3 (or H x W) -> PNG bytes, in memory."""
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def display_image(image: np.ndarray, longest: int = 512) -> np.ndarray:
    """uint8 H x W downscaled so its longest side is at most `longest` (for overlays and pages)."""
    h, w = image.shape[:2]
    if max(h, w) <= longest:
        return image
    scale = longest / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))


def panel_title(name: str, prob: float | None, threshold: float | None = None) -> str:
    """A panel's title: the finding, its probability and, with a threshold, positive or negative."""
    if prob is None:
        return f"{name}\nnot scored"
    if threshold is None:
        return f"{name}\np = {prob:.2f}"
    verdict = f">= {threshold:.2f}: positive" if prob >= threshold else f"< {threshold:.2f}: negative"
    return f"{name}\np = {prob:.2f} {verdict}"


def grid_figure(
    image: np.ndarray,
    maps: np.ndarray,
    probs: Sequence[float] | None,
    resize: str = "stretch",
    names: Sequence[str] = PATHOLOGIES,
    title: str = "",
    thresholds: Sequence[float] | None = None,
    notes: Sequence[str | None] | None = None,
) -> Figure:
    """The paper's Figures 3-4: the image, then one overlay per pathology titled with its probability,
    positive or negative against its threshold (`probs` None: a withheld image, titled "not scored"),
    and under a blank map the note saying why."""
    fig = Figure(figsize=(3 * (len(names) + 1), 3.4), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(names) + 1)
    axes[0].imshow(image, cmap="gray", vmin=0, vmax=255)
    axes[0].set_title("image")
    n = len(names)
    for ax, sal, p, t, note, name in zip(
        axes[1:], maps, probs or [None] * n, thresholds or [None] * n, notes or [None] * n, names, strict=True
    ):
        ax.imshow(overlay(image, sal, resize=resize))
        ax.set_title(panel_title(name, p, t), fontsize=9)
        if note:
            ax.text(
                0.5,
                -0.04,
                note.replace(" (", "\n("),
                transform=ax.transAxes,
                ha="center",
                va="top",
                fontsize=7,
                wrap=True,
            )
    for ax in axes:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def save_explanation(
    image: np.ndarray,
    maps: np.ndarray,
    probs: Sequence[float] | None,
    out_dir: str | Path,
    stem: str,
    *,
    resize: str = "stretch",
    title: str = "",
    thresholds: Sequence[float] | None = None,
    notes: Sequence[str | None] | None = None,
) -> list[Path]:
    """Write `{stem}_{slug}.png` overlays (one per pathology) and `{stem}_grid.png`; return the paths.

    `probs` None: the image's findings are withheld, and the grid shows no probability."""
    n_probs = len(SLUGS) if probs is None else len(probs)
    if len(maps) != len(SLUGS) or n_probs != len(SLUGS):
        raise SaliencyError(f"expected {len(SLUGS)} maps and probabilities; got {len(maps)} and {n_probs}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shown = display_image(image)
    paths = []
    for slug, sal in zip(SLUGS, maps, strict=True):
        paths.append(out_dir / f"{stem}_{slug}.png")
        paths[-1].write_bytes(png_bytes(overlay(shown, sal, resize=resize)))
    grid = out_dir / f"{stem}_grid.png"
    grid_figure(shown, maps, probs, resize=resize, title=title, thresholds=thresholds, notes=notes).savefig(
        grid
    )
    return [*paths, grid]
