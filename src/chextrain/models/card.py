"""What a bundle says about itself: the model card (README.md) and the `chextrain info` text.

Both are made from model.json alone (plus, for the card, the confidence intervals the stage
lifecycle computes from its predictions tables), so a bundle copied anywhere still describes
itself. The card follows the Hugging Face model-card layout: YAML front matter, then model
details, intended use, training data, evaluation, limitations, how to use it and how to cite.
Standard library only.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

from chextrain.labels import PATHOLOGIES, SLUGS

SHORT = {s: n for s, n in zip(SLUGS, ("effusion", "edema", "atelect.", "consol.", "cardiom."), strict=True)}
CITATION = """\
- *CheXtraining: training robust models for interpretation of photos of chest x-rays* (the study
  chextrain reproduces; cite the paper).
- Irvin et al., *CheXpert: A Large Chest Radiograph Dataset with Uncertainty Labels and Expert
  Comparison*, AAAI 2019 (arXiv:1901.07031).
- Phillips et al., *CheXphoto: 10,000+ Photos and Transformations of Chest X-rays for Benchmarking
  Deep Learning Robustness*, ML4H 2020 (arXiv:2007.06199)."""


def _num(value: Any, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if isinstance(value, int | float) and math.isfinite(value) else "-"


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _averages(meta: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    """(split/group, its `average` metrics) for every evaluated group of model.json's metrics."""
    out = []
    for name, per in _mapping(meta.get("metrics")).items():
        if isinstance(per, Mapping) and isinstance(per.get("average"), Mapping):
            out.append((str(name), per["average"]))
    return out


def training_lines(meta: Mapping[str, Any]) -> list[str]:
    """Where the weights come from and what trained them, one fact per line."""
    config = _mapping(meta.get("config"))
    training = _mapping(meta.get("training"))
    data = _mapping(config.get("data"))
    lines = [f"objective: {meta.get('objective') or config.get('objective', 'supervised')}"]
    if config.get("init"):
        lines.append(f"init: {config['init']}")
    if data:
        kinds = ", ".join(data.get("kinds") or []) or "all kinds"
        lines.append(f"data: {', '.join(data.get('train') or [])} ({kinds})")
        if data.get("budget"):
            lines.append(f"budget: {data['budget']}")
    if "train_rows" in training:
        lines.append(f"images: {training['train_rows']} train, {training.get('val_rows', 0)} validation")
    if "global_step" in training:
        lines.append(
            f"steps: {training['global_step']} ({training.get('epochs', '?')} epochs, "
            f"world size {training.get('world_size', 1)}, {training.get('weights', 'last')} weights)"
        )
    for key in ("policy", "freeze", "train_heads"):
        value = config.get(key)
        if value is not None:
            lines.append(f"{key}: {', '.join(map(str, value)) if isinstance(value, list) else value}")
    if isinstance(config.get("optimizer"), Mapping):
        opt = config["optimizer"]
        lines.append(f"optimizer: {opt.get('name')} lr {opt.get('lr')}, batch {config.get('batch_size')}")
    return lines


def info_text(
    meta: Mapping[str, Any], where: str, files: Mapping[str, str], tensors: Mapping[str, int]
) -> str:
    """`chextrain info`: architecture, heads, router, pathologies, preprocessing, thresholds,
    calibration, training data and metrics per kind, in lines of at most 80 columns."""
    arch = meta["architecture"]
    prep = meta["preprocessing"]
    lines = [f"bundle: {where}"]
    lines += [f"  {name}: {size}" for name, size in files.items()]
    lines.append(f"  weights: {tensors['tensors']} tensors, {tensors['parameters'] / 1e6:.2f} M values")
    label = meta.get("label")
    lines.append(
        f"stage: {meta.get('stage')}" + (f" ({label})" if label and label != meta.get("stage") else "")
    )
    lines.append(
        f"architecture: {arch['backbone']}, {arch.get('num_features', '?')} features, "
        f"heads {', '.join(arch['heads'])}, router {'yes' if arch['router'] else 'no'}"
    )
    lines.append("domain heads: " + ", ".join(f"{d} -> {h}" for d, h in meta["domain_heads"].items()))
    lines.append("pathologies: " + ", ".join(PATHOLOGIES))
    extra = ", ".join(f"{k} {v}" for k, v in prep.items() if k != "name")
    lines.append(
        f"input: {meta['image_size']} px, preprocessing {prep['name']}" + (f" ({extra})" if extra else "")
    )
    lines.append("thresholds (tuned on validation; 0.5 = not tuned):")
    lines.append("  " + f"{'head':<10}" + "".join(f"{SHORT[s]:>10}" for s in SLUGS))
    for head, per in meta["thresholds"].items():
        lines.append("  " + f"{head[:10]:<10}" + "".join(f"{_num(per.get(s), 2):>10}" for s in SLUGS))
    lines.append("probability calibration: " + temperature_text(meta))
    lines.append("OOD check: " + calibration_text(meta))
    if isinstance(meta.get("router"), Mapping):
        router = meta["router"]
        lines.append(f"router accuracy on validation: {_num(router.get('overall'))} (n={router.get('n')})")
    lines.append("training:")
    lines += [f"  {line}" for line in training_lines(meta)]
    rows = _averages(meta)
    if rows:
        lines.append("metrics (average over the 5 pathologies, threshold 0.5):")
        lines.append(f"  {'split/group':<36}{'AUC':>8}{'MCC':>8}{'F1':>8}{'n':>7}")
        for name, avg in rows:
            n = avg.get("support")
            count = f"{n:.0f}" if isinstance(n, int | float) and math.isfinite(n) else "-"
            lines.append(
                f"  {name[-36:]:<36}{_num(avg.get('auc')):>8}{_num(avg.get('mcc')):>8}"
                f"{_num(avg.get('f1')):>8}{count:>7}"
            )
    else:
        lines.append("metrics: none (not evaluated)")
    return "\n".join(wrapped for line in lines for wrapped in _wrap(line))


def _wrap(line: str, width: int = 80) -> list[str]:
    """A line cut at spaces to `width` columns, continuation lines indented under it."""
    if len(line) <= width:
        return [line]
    indent = " " * (len(line) - len(line.lstrip()) + 4)
    return textwrap.wrap(line, width, subsequent_indent=indent, break_on_hyphens=False)


def temperature_text(meta: Mapping[str, Any]) -> str:
    """One line on the temperature scaling per head (fitted on validation; predict applies it)."""
    temps = meta.get("temperature")
    if not isinstance(temps, Mapping) or not temps:
        return "none (probabilities are the network's sigmoids)"
    per = ", ".join(f"{head} T={_num(t, 2)}" for head, t in temps.items())
    return f"temperature per head fitted on validation ({per}); `predict --no-calibration` skips it"


def calibration_text(meta: Mapping[str, Any]) -> str:
    """One line on the OOD calibration (or its absence)."""
    ood = meta.get("ood")
    if not isinstance(ood, Mapping) or not ood:
        return "not calibrated (out-of-distribution images are not flagged)"
    band = ood.get("router_band")
    return (
        f"{ood.get('method')}, threshold {_num(ood.get('threshold'))} "
        f"({_num(100 * float(ood.get('quantile', 0.99)), 0)}th percentile of {ood.get('n')} validation "
        f"images), {len(ood.get('groups', []))} feature groups" + (f", router band {band}" if band else "")
    )


def _evaluation_section(meta: Mapping[str, Any], evaluation: Sequence[Mapping[str, Any]] | None) -> list[str]:
    if evaluation:
        lines = [
            "Average over the five pathologies at threshold 0.5; 95% confidence intervals from a",
            "patient-level bootstrap of the test predictions (chextrain.evaluation.bootstrap).",
            "",
            "| split | comparison / kind | n | AUC (95% CI) | MCC (95% CI) |",
            "|---|---|---|---|---|",
        ]
        keyed: dict[tuple[str, str], dict[str, Any]] = {}
        for row in evaluation:
            entry = keyed.setdefault((str(row["split"]), str(row["group"])), {"n": row.get("n")})
            entry[row["metric"]] = (row["value"], row["ci_low"], row["ci_high"])
        for (split, group), entry in keyed.items():
            cells = [
                f"{_num(v[0])} ({_num(v[1])} to {_num(v[2])})" if (v := entry.get(m)) else "-"
                for m in ("auc", "mcc")
            ]
            lines.append(f"| {split} | {group} | {entry.get('n') or '-'} | {cells[0]} | {cells[1]} |")
        return lines
    rows = _averages(meta)
    if not rows:
        return ["This bundle was not evaluated (e.g. a MoCo encoder: its heads are untrained)."]
    lines = [
        "Average over the five pathologies at threshold 0.5 (point estimates; `chextrain study report`",
        "gives confidence intervals).",
        "",
        "| split/group | n | AUC | MCC | F1 |",
        "|---|---|---|---|---|",
    ]
    for name, avg in rows:
        n = avg.get("support")
        count = f"{n:.0f}" if isinstance(n, int | float) and math.isfinite(n) else "-"
        lines.append(
            f"| {name} | {count} | {_num(avg.get('auc'))} | {_num(avg.get('mcc'))} | {_num(avg.get('f1'))} |"
        )
    return lines


def model_card(meta: Mapping[str, Any], evaluation: Sequence[Mapping[str, Any]] | None = None) -> str:
    """README.md of a bundle in the Hugging Face model-card layout.

    Args:
        meta: the bundle's model.json (as written by models.bundle.save_bundle).
        evaluation: optional rows {split, group, n, metric (auc|mcc), value, ci_low, ci_high}
            (averages over the pathologies with bootstrap CIs); without them the card shows
            model.json's point estimates.
    """
    arch = meta["architecture"]
    title = meta.get("label") or meta.get("stage") or "chextrain model"
    moco = (meta.get("objective") or _mapping(meta.get("config")).get("objective")) == "moco"
    front = [
        "---",
        "library_name: chextrain",
        "pipeline_tag: image-classification",
        "tags: [chest-x-ray, radiology, multi-label-classification, chexpert, chexphoto, research-only]",
        "datasets: [stanfordmlgroup/chexpert, stanfordmlgroup/chexphoto]",
        "metrics: [auc, mcc]",
        "---",
        "",
    ]
    body = [
        f"# {title}",
        "",
        "A chextrain bundle (`model.safetensors` + `model.json`)"
        + (f" made by stage `{meta['stage']}`." if meta.get("stage") else "."),
        "",
        "## Model details",
        "",
        f"- Architecture: {arch['backbone']} encoder ({arch.get('num_features', '?')} features), "
        f"heads {', '.join(arch['heads'])}; domain router: {'yes' if arch['router'] else 'no'}.",
        "- Heads used per domain: " + ", ".join(f"{d} -> {h}" for d, h in meta["domain_heads"].items()) + ".",
        "- Outputs: one probability per finding, in this order: " + ", ".join(PATHOLOGIES) + ".",
        f"- Input: {meta['image_size']} x {meta['image_size']} px, preprocessing "
        f"`{meta['preprocessing'].get('name')}`.",
        "- Decision thresholds per head (tuned on validation; 0.5 when not tuned): see `model.json`.",
        f"- Probability calibration: {temperature_text(meta)}.",
        f"- Out-of-distribution check: {calibration_text(meta)}.",
        "",
        "## Intended use",
        "",
        "Research on chest x-ray classifiers that must work on digital x-rays and on smartphone photos",
        "of x-rays: reproducing and comparing training strategies, studying robustness to photos.",
        "",
        "**Not a medical device.** It has not been cleared or approved by any regulator and must not",
        "be used to diagnose, treat or triage patients, nor replace the reading of a qualified clinician.",
        "",
        "## Training data",
        "",
        *[f"- {line}" for line in training_lines(meta)],
        "",
        "## Evaluation",
        "",
        *_evaluation_section(meta, evaluation),
        "",
        "## Limitations",
        "",
        "- Labels of CheXpert-style data are extracted from reports and are noisy; uncertain labels",
        f"  follow the `{meta.get('policy', 'ones')}` policy.",
        "- Scores outside the training distribution (other hospitals, devices, phones, paediatric",
        "  images, other views) are unknown; flagged images (OOD, unsure router) should not be scored.",
        "- Metrics on small test sets have wide confidence intervals; a demo bundle is trained on",
        "  generated phantom images and says nothing about real radiographs.",
        *(
            ["- This is a MoCo encoder: its heads are untrained; fine-tune it before predicting."]
            if moco
            else []
        ),
        "",
        "## How to use",
        "",
        "```",
        "chextrain info BUNDLE                 # what this file says about the model",
        "chextrain predict BUNDLE IMAGE...     # findings per image (the router picks the head)",
        "chextrain serve BUNDLE                # web page and JSON API on 127.0.0.1",
        "```",
        "",
        "## Citation",
        "",
        CITATION,
        "",
    ]
    return "\n".join(front + body)
