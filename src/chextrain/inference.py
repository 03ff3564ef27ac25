"""Use a bundle on images: preprocess, route each image to a head, flag what the model cannot judge.

`Predictor` is the one inference path shared by `chextrain predict`, `chextrain serve` and
`chextrain explain`. For every image it reports the head used, the router's P(photo), the domain
chosen, an out-of-distribution (OOD) check, and per pathology the probability and the decision
at the bundle's threshold for that head.

Guarding. An image is flagged, never silently scored, when
- its features lie far from those of the validation images (the OOD check of `chextrain.ood`:
  Mahalanobis distances of encoder statistics, thresholded at the 99th percentile of validation
  images; the bundle's meta "ood"); or
- the router cannot place it (P(photo) inside `ROUTER_BAND`).
A bundle without OOD calibration says so in every result (status "uncalibrated"); nothing is
computed silently in its place.

Calibration. A bundle's model.json may hold a temperature per head (`temperature`, fitted on
validation by evaluation.calibration); each head's probabilities are then sigmoid(logit(p) / T),
the same for both runtimes (the ONNX graph returns the raw sigmoids), and its thresholds map the
same way (decisions.scale_thresholds), so every decision is the one the raw probability makes.
`calibrated=False` (the CLI's `--no-calibration`) reports the raw probabilities; bundles without
temperatures use T = 1.

Withholding. A flagged image (OOD, unsure router, or a photo that fails the quality gate) has its
findings withheld unless the caller asks to score it anyway (`score_anyway`): its result says
`withheld: true` and `withheld_reason`, and the per-pathology dict moves from "pathologies" to
"withheld_pathologies" (kept for research use, never shown as findings). See decisions.withhold;
the bundle's temperatures and the thresholds they move live in chextrain/decisions.py too.

Test-time augmentation (TTA) averages a fixed set of small zooms and shifts. No flips: a chest
x-ray is not left-right symmetric (the heart lies left; cardiomegaly is judged on that side).
The views and their warp live in chextrain/tta.py.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from chextrain.data.images import load_image
from chextrain.data.rectified import DRAFT_FACTOR, MIN_DRAFT, RectifiedDecoding, make_decoding
from chextrain.data.transforms import (
    as_preprocessing,
    input_uint8,
    resize,
    to_grey,
    to_network_input,
    xrv_input,
)
from chextrain.decisions import PredictorError, bundle_temperatures, scale_thresholds, withhold
from chextrain.evaluation.calibration import apply_temperature
from chextrain.labels import NAME_OF, SLUGS
from chextrain.models.bundle import load_bundle
from chextrain.models.net import CXRNet
from chextrain.ood import ROUTER_BAND, OODError, ScoringNet, check_calibration, combined_scores, run_batch
from chextrain.quality import HasCorners, assess, thresholds_from_meta
from chextrain.tta import TTA_VIEWS, jitter

ROUTE_CHOICES: tuple[str, ...] = ("auto", "digital", "photo")  # "auto": the router picks the head
RUNTIMES: tuple[str, ...] = ("torch", "onnx")


class Runtime(Protocol):
    """Runs the network on a batch: x float32 B x 3 x S x S -> probs, p_photo, features."""

    name: str

    def __call__(self, x: np.ndarray) -> dict[str, np.ndarray | None]: ...


class TorchRuntime:
    """Eager PyTorch where the model lives: probs B x heads x C, p_photo B (or None), features B x D."""

    name = "torch"

    def __init__(self, model: CXRNet) -> None:
        self.net = ScoringNet(model.eval()).eval()

    def __call__(self, x: np.ndarray) -> dict[str, np.ndarray | None]:
        out = run_batch(self.net, torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
        return {"probs": out[0], "p_photo": out[1] if len(out) == 3 else None, "features": out[-1]}


# --- the predictor -------------------------------------------------------------------------


class Predictor:
    """A bundle ready to answer images: the model, its meta, a runtime and the routing rule."""

    def __init__(
        self,
        model: CXRNet,
        meta: Mapping[str, Any],
        *,
        runtime: Runtime | None = None,
        domain: str = "auto",
        name: str = "",
        calibrated: bool = True,
    ) -> None:
        if domain not in ROUTE_CHOICES:
            raise PredictorError(f"domain {domain!r} is not one of {list(ROUTE_CHOICES)}")
        self.model, self.meta, self.name = model.eval(), dict(meta), name
        self.runtime = runtime if runtime is not None else TorchRuntime(model)
        self.domain = domain
        self.size = int(meta["image_size"])
        self.preprocessing = as_preprocessing(meta.get("preprocessing", "imagenet"))
        rectified = self.preprocessing.rectify is not None
        self.rectifier = make_decoding(self.size, self.preprocessing) if rectified else None
        self.thresholds: dict[str, dict[str, float]] = meta["thresholds"]
        self.domain_heads: dict[str, str] = meta["domain_heads"]
        self.single_head = self.domain_heads["digital"] == self.domain_heads["photo"]
        if domain == "auto" and not self.single_head and model.router is None:
            raise PredictorError(
                f"bundle {name or ''} has heads {model.head_names} but no router: pass "
                "domain 'digital' or 'photo' to choose the head"
            )
        try:
            self.ood = check_calibration(meta.get("ood"), model)
        except OODError as err:
            raise PredictorError(f"bundle {name}: {err}" if name else str(err)) from None
        self.quality_thresholds, self.quality_source = thresholds_from_meta(self.meta)  # model.json "quality"
        band = (self.ood or {}).get("router_band", ROUTER_BAND)
        self.router_band: tuple[float, float] = (float(band[0]), float(band[1]))
        self.temperature = bundle_temperatures(meta, model.head_names, name) if calibrated else {}
        self.thresholds = scale_thresholds(self.thresholds, self.temperature)  # as the probabilities
        self.lock = threading.RLock()  # one inference at a time: correct and not oversubscribed

    @classmethod
    def from_bundle(
        cls,
        path: str | Path,
        *,
        runtime: str = "torch",
        domain: str = "auto",
        onnx_path: str | Path | None = None,
        threads: int | None = None,
        calibrated: bool = True,
    ) -> Predictor:
        """Load a bundle (folder or model.json); `runtime` onnx runs an exported ONNX file.

        calibrated: apply the bundle's temperatures (False: the raw sigmoid probabilities).

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
        return cls(model, meta, runtime=run, domain=domain, name=bundle_dir.name, calibrated=calibrated)

    @property
    def pathology_names(self) -> list[str]:
        """The pathology names in the model's output order."""
        return list(self.meta["pathologies"])

    def read(self, path: str | Path, *, truncated: str = "error") -> np.ndarray:
        """Decode an image file as evaluation does for this bundle: a large JPEG at the smallest
        scale not below the bundle's image size (`draft`), grey. ImageLoadError naming the file."""
        draft = None if self.preprocessing.name == "xrv" else self.size  # XRV resizes the full decode
        if self.rectifier is not None and draft is not None:  # a photo is flattened before the resize
            draft = max(DRAFT_FACTOR * self.size, MIN_DRAFT)
        return load_image(path, truncated=truncated, draft=draft)

    def inputs(self, image: np.ndarray, tta: bool = False) -> torch.Tensor:
        """uint8 H x W (or H x W x 3) -> network inputs V x 3 x S x S (V = 1, or the TTA views).

        The worker's step (resize once, jitter per view, histeq) in uint8, then the device's
        (transforms.to_network_input) on the CPU, where the runtimes take their input.
        """
        views = TTA_VIEWS if tta else TTA_VIEWS[:1]
        if self.preprocessing.name == "xrv":  # XRV's resize runs in float on the full image: exact XRV input
            return torch.stack([xrv_input(jitter(to_grey(image), *v), self.size) for v in views])
        small = resize(to_grey(image), self.size, self.preprocessing.resize)  # S x S, once
        batch = np.stack([input_uint8(jitter(small, *v), self.preprocessing) for v in views])  # V x S x S
        return to_network_input(torch.from_numpy(batch), self.preprocessing)

    def predict_images(
        self,
        images: Sequence[np.ndarray],
        names: Sequence[str] | None = None,
        *,
        tta: bool = False,
        batch_size: int = 16,
        domain: str | None = None,
        score_anyway: bool = False,
        quads: Sequence[HasCorners | None] | None = None,
    ) -> list[dict[str, Any]]:
        """One result dict per image (see `_result`), in order; `domain` overrides the default.

        Photos get the quality gate (`gate_quality`; `quads`: the radiograph's quadrilateral per
        image, None: the whole image). Flagged images have their findings withheld (`withhold`)
        unless `score_anyway`. A bundle whose preprocessing says `rectify` scores each image taken
        as a photo (forced, or routed so) flattened, as its training did (`rectify_photos`).
        """
        names = list(names) if names is not None else [f"image{i}" for i in range(len(images))]
        if len(names) != len(images):
            raise PredictorError(f"got {len(images)} images but {len(names)} names")
        if batch_size < 1:
            raise PredictorError(f"batch_size must be >= 1; got {batch_size}")
        domain = self.domain if domain is None else domain
        if domain not in ROUTE_CHOICES:
            raise PredictorError(f"domain {domain!r} is not one of {list(ROUTE_CHOICES)}")
        quads = [None] * len(images) if quads is None else list(quads)
        if len(quads) != len(images):
            raise PredictorError(f"got {len(images)} images but {len(quads)} quadrilaterals")
        if self.rectifier is not None and domain == "photo":
            out, quads = self.rectify_photos([], images, names, quads, tta, batch_size, domain)
        else:
            out = self._score(images, names, tta, batch_size, domain)
            if self.rectifier is not None:
                out, quads = self.rectify_photos(out, images, names, quads, tta, batch_size, domain)
        gated = [self.gate_quality(r, im, q) for r, im, q in zip(out, images, quads, strict=True)]
        return [withhold(r, score_anyway=score_anyway) for r in gated]

    def rectify_photos(
        self,
        first: list[dict[str, Any]],
        images: Sequence[np.ndarray],
        names: Sequence[str],
        quads: list[Any],
        tta: bool,
        batch_size: int,
        domain: str,
    ) -> tuple[list[dict[str, Any]], list[Any]]:
        """Score the photos flattened (the bundle's `rectify`): every image when `domain` is photo
        (`first` empty), else those `first` routed as photos, whose routing (P(photo), the router's
        warning) is kept. A given quad's corners are used as they are; else rectify.find_quad's.
        Each result gets "rectify": applied, method, confidence, corners (TL, TR, BR, BL px); the
        quads returned hold the found ones, for the quality gate's tilt."""
        rectifier = self.rectifier
        if not isinstance(rectifier, RectifiedDecoding):
            raise PredictorError(f"bundle {self.name}: its preprocessing does not rectify photos")
        which = [i for i in range(len(images)) if not first or first[i]["domain"] == "photo"]
        flat, found = [], []
        for i in which:
            given = getattr(quads[i], "corners", None)
            image, quad = rectifier.flatten(np.asarray(images[i]), given)
            flat.append(image)
            found.append(quad)
        scored = self._score(flat, [names[i] for i in which], tta, batch_size, "photo")
        out = list(first) if first else [None] * len(images)
        quads = list(quads)
        for k, i in enumerate(which):
            result = scored[k]
            if first:  # keep how the plain image was routed
                before = first[i]
                router = [w for w in before["warnings"] if w.startswith("the router")]
                result.update(
                    p_photo=before["p_photo"],
                    domain_source=before["domain_source"],
                    router_uncertain=before["router_uncertain"],
                    warnings=router + result["warnings"],
                )
                result["flagged"] = bool(result["warnings"])
            quad = found[k]
            result["rectify"] = {
                "applied": quad.method != "none",
                "method": quad.method,
                "confidence": float(quad.confidence),
                "corners": np.asarray(quad.corners, np.float64).round(2).tolist(),
            }
            if quads[i] is None and quad.method != "none":
                quads[i] = quad
            out[i] = result
        for result in out:
            if result is not None and "rectify" not in result:
                result["rectify"] = {"applied": False, "method": None, "confidence": None, "corners": None}
        return out, quads

    def _score(
        self, images: Sequence[np.ndarray], names: Sequence[str], tta: bool, batch_size: int, domain: str
    ) -> list[dict[str, Any]]:
        """One result dict per image from the network (routing, OOD), before the quality gate."""
        out: list[dict[str, Any]] = []
        for i in range(0, len(images), batch_size):
            chunk = images[i : i + batch_size]
            x = torch.cat([self.inputs(im, tta) for im in chunk]).numpy()  # (B*V) x 3 x S x S
            with self.lock:
                raw = self.runtime(x)
            v = len(TTA_VIEWS) if tta else 1
            probs = raw["probs"].reshape(len(chunk), v, *raw["probs"].shape[1:]).mean(axis=1)  # B x heads x C
            probs = self.calibrate(probs)  # each head through its temperature (as is without any)
            p_photo = None if raw["p_photo"] is None else raw["p_photo"].reshape(len(chunk), v).mean(axis=1)
            features = raw["features"].reshape(len(chunk), v, -1)[:, 0]  # B x D, the untouched view
            scores = combined_scores(features, self.ood["groups"]) if self.ood else None
            for j, name in enumerate(names[i : i + len(chunk)]):
                out.append(
                    self._result(
                        name,
                        probs[j],
                        None if p_photo is None else float(p_photo[j]),
                        None if scores is None else float(scores[j]),
                        domain,
                        tta,
                    )
                )
        return out

    def gate_quality(
        self, result: dict[str, Any], image: np.ndarray, quad: HasCorners | None
    ) -> dict[str, Any]:
        """`result` with "quality": the photo checks (chextrain.quality.assess) when the image was
        scored as a photo, else None (a digital x-ray is not a photo of one). A failed check flags the
        image, with the retake advice as its warning."""
        result["quality"] = None
        if result["domain"] == "photo":
            report = assess(image, quad, self.quality_thresholds, self.quality_source)
            result["quality"] = report
            if not report["passed"]:
                failed = [k for k, c in report["checks"].items() if c["verdict"] == "fail"]
                result["warnings"].append(
                    f"the photo fails the quality checks ({', '.join(failed)}): {report['retake']}"
                )
                result["flagged"] = True
        return result

    def calibrate(self, probs: np.ndarray) -> np.ndarray:
        """B x heads x C probabilities with each head's temperature applied (float64); as is without any."""
        if not self.temperature:
            return probs
        out = probs.astype(np.float64)
        for head, t in self.temperature.items():
            i = self.model.head_index(head)
            out[:, i] = apply_temperature(out[:, i], t)
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

    def _result(
        self, name: str, probs: np.ndarray, p_photo: float | None, score: float | None, domain: str, tta: bool
    ) -> dict[str, Any]:
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
            ood = {
                "status": "out-of-distribution" if flag else "in-distribution",
                "flag": flag,
                "score": score,
                "threshold": float(self.ood["threshold"]),
            }
            if flag:
                warnings.append(
                    "this image does not look like the chest x-rays or photos of them the model "
                    f"was validated on (OOD score {score:.3g} > {self.ood['threshold']:.3g})"
                )
        pathologies = {}
        for k, slug in enumerate(SLUGS):
            t = float(self.thresholds[head][slug])
            pathologies[slug] = {
                "name": NAME_OF[slug],
                "prob": float(probs_h[k]),
                "threshold": t,
                "positive": bool(probs_h[k] >= t),
            }
        return {
            "name": name,
            "head": head,
            "domain": chosen,
            "domain_source": how,
            "p_photo": p_photo,
            "router_uncertain": unsure,
            "ood": ood,
            "flagged": bool(warnings),
            "warnings": warnings,
            "tta": tta,
            "temperature": self.temperature.get(head, 1.0),
            "pathologies": pathologies,
        }
