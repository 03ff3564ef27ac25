"""ONNX export of a bundle and an onnxruntime runtime for `Predictor`.

The exported graph takes `image` float32 B x 3 x S x S (preprocessed as the bundle says; B is a
dynamic axis) and returns every head and the router at once, so routing and the OOD check
happen outside the graph exactly as with PyTorch:
    probs     B x heads x C   sigmoid probabilities of all heads
    p_photo   B               the router's P(photo) (only when the model has a router)
    features  B x D           OOD features: pooled statistics of tapped blocks, then the
                              encoder's features (see ood.ScoringNet)
The bundle's meta (pathologies, heads, thresholds, domain heads, preprocessing, image size,
OOD calibration, temperatures) and the SHA-256 of its weights go into the model's metadata_props
under `chextrain`, so a runtime can refuse an ONNX file made from other weights.

`probs` are the raw sigmoids. A bundle's temperature per head is applied by the runtime, not in the
graph (metadata `calibration`: TEMPERATURE_NOTE), exactly as for PyTorch: inference.Predictor
maps each head's probabilities and thresholds with evaluation.calibration.apply_temperature.

The TorchScript-based exporter (`dynamo=False`) is used: it needs no extra package; torch
warns that it is deprecated in favour of the dynamo exporter (which needs onnxscript).
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

from chextrain.errors import ChextrainError
from chextrain.fileio import atomic_write_bytes
from chextrain.models.bundle import META_FILE, WEIGHTS_FILE
from chextrain.models.net import CXRNet
from chextrain.ood import ScoringNet, run_batch

ONNX_FILE = "model.onnx"  # looked for next to a bundle's model.json
METADATA_KEY = "chextrain"
DEFAULT_OPSET = 17
TEMPERATURE_NOTE = (
    "probs are uncalibrated sigmoids; the runtime applies `temperature` per head: "
    "sigmoid(logit(p) / T), thresholds likewise (absent: T = 1)"
)


class ExportError(ChextrainError):
    """An export or an ONNX file that cannot be used as asked; the message names the file."""


def output_names(model: CXRNet) -> list[str]:
    """The graph's output names for this model (p_photo only with a router)."""
    return ["probs", "p_photo", "features"] if model.router is not None else ["probs", "features"]


def weights_sha256(bundle: str | Path) -> str:
    """SHA-256 hex digest of a bundle's model.safetensors (folder, model.json or the file)."""
    path = Path(bundle)
    path = path / WEIGHTS_FILE if path.is_dir() else path.parent / WEIGHTS_FILE
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def export_onnx(
    model: CXRNet,
    meta: Mapping[str, Any],
    out: str | Path | None = None,
    *,
    opset: int = DEFAULT_OPSET,
    image_size: int | None = None,
    sha256: str = "",
) -> bytes:
    """Export `model` (all heads + router + features) to ONNX; write it to `out` if given.

    image_size defaults to the bundle's; the batch axis is dynamic. Returns the model's bytes.
    """
    if opset < 17:
        raise ExportError(f"opset {opset} is too old; use 17 or newer")
    size = int(image_size or meta["image_size"])
    wrapper = ScoringNet(model.eval()).eval()
    names = output_names(model)
    buf = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(
            wrapper,
            (torch.zeros(1, 3, size, size),),
            buf,
            dynamo=False,
            opset_version=opset,
            input_names=["image"],
            output_names=names,
            dynamic_axes={n: {0: "batch"} for n in ["image", *names]},
        )
    proto = onnx.load_from_string(buf.getvalue())
    keep = (
        "pathologies",
        "slugs",
        "architecture",
        "image_size",
        "preprocessing",
        "thresholds",
        "domain_heads",
        "ood",
        "stage",
        "temperature",
    )
    info = {k: meta[k] for k in keep if k in meta} | {
        "onnx_image_size": size,
        "outputs": names,
        "weights_sha256": sha256,
        "calibration": TEMPERATURE_NOTE,
    }
    onnx.helper.set_model_props(proto, {METADATA_KEY: json.dumps(info)})
    data = proto.SerializeToString()
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out, data)
    return data


def read_onnx_metadata(source: str | Path | bytes) -> dict[str, Any]:
    """The `chextrain` metadata dict stored in an exported ONNX file (or its bytes)."""
    where = "<bytes>" if isinstance(source, bytes) else str(source)
    try:
        proto = onnx.load_from_string(source) if isinstance(source, bytes) else onnx.load(str(source))
    except Exception as err:  # onnx raises DecodeError, OSError, ...
        raise ExportError(f"{where} is not a readable ONNX file: {err}") from None
    props = {p.key: p.value for p in proto.metadata_props}
    if METADATA_KEY not in props:
        raise ExportError(f"{where} has no {METADATA_KEY!r} metadata: export it with `chextrain export`")
    return json.loads(props[METADATA_KEY])


class OnnxRuntime:
    """onnxruntime on the CPU with the same outputs as `inference.TorchRuntime`."""

    name = "onnx"

    def __init__(self, source: str | Path | bytes, threads: int | None = None) -> None:
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        model = source if isinstance(source, bytes) else str(source)
        try:
            self.session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own exception types
            where = "<bytes>" if isinstance(source, bytes) else source
            raise ExportError(f"onnxruntime cannot load {where}: {err}") from None
        self.outputs = [o.name for o in self.session.get_outputs()]

    def __call__(self, x: np.ndarray) -> dict[str, np.ndarray | None]:
        values = self.session.run(None, {"image": np.ascontiguousarray(x, dtype=np.float32)})
        out: dict[str, np.ndarray | None] = dict(zip(self.outputs, values, strict=True))
        out.setdefault("p_photo", None)
        return out


def onnx_runtime_for_bundle(
    model: CXRNet,
    meta: Mapping[str, Any],
    bundle: str | Path,
    onnx_path: str | Path | None = None,
    threads: int | None = None,
) -> OnnxRuntime:
    """An OnnxRuntime for a loaded bundle: `onnx_path`, the bundle's model.onnx, or an in-memory export.

    Refuses a file whose recorded weights digest or image size differs from the bundle's.
    """
    bundle = Path(bundle)
    folder = bundle if bundle.is_dir() else bundle.parent
    sha = weights_sha256(folder / META_FILE)
    path = Path(onnx_path) if onnx_path is not None else folder / ONNX_FILE
    if onnx_path is None and not path.is_file():
        return OnnxRuntime(export_onnx(model, meta, sha256=sha), threads=threads)
    if not path.is_file():
        raise ExportError(f"ONNX file {path} does not exist")
    info = read_onnx_metadata(path)
    if info.get("weights_sha256") != sha:
        raise ExportError(
            f"ONNX file {path} was exported from other weights than the bundle {folder} "
            "(weights digest differs): export it again with `chextrain export`"
        )
    if int(info.get("onnx_image_size", -1)) != int(meta["image_size"]):
        raise ExportError(
            f"ONNX file {path} takes {info.get('onnx_image_size')} px images; the bundle "
            f"preprocesses to {meta['image_size']} px"
        )
    return OnnxRuntime(path, threads=threads)


def max_prob_difference(model: CXRNet, runtime: OnnxRuntime, x: torch.Tensor) -> float:
    """max |sigmoid probability difference| between PyTorch and onnxruntime on x B x 3 x S x S."""
    ref = run_batch(ScoringNet(model.eval()), x)[0]  # B x heads x C
    return float(np.abs(runtime(x.numpy())["probs"] - ref).max())
