"""Labels, metadata and patients of the demo tree, sampled from the real CheXpert statistics.

The joint states of the five pathologies come from resources/chexpert_label_stats.json (counts
from the real train.csv); the other label columns, studies per patient and views per study use
the real marginal rates; valid labels are drawn at the real valid prevalences.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from importlib import resources

import numpy as np

from chextrain.errors import ChextrainError
from chextrain.labels import LABEL_COLUMNS, NAME_OF, PATHOLOGIES, SLUG_OF, SLUGS

CHEXPERT_DIR, CHEXPHOTO_DIR = "CheXpert-v1.0-small", "CheXphoto-v1.0"
# Studies per patient (1..10) and views per study (1..3) in the real train.csv (tail folded in).
STUDIES_P = (0.5201, 0.1731, 0.0917, 0.0567, 0.0385, 0.0258, 0.0183, 0.0139, 0.0108, 0.0082)
VIEWS_P = (0.8188, 0.1717, 0.0095)
LATERAL_P = {2: 0.901, 3: 0.977}  # chance that view 2 / view 3 of a study is a lateral
# Other label columns: P(1.0), P(0.0), P(-1.0) in the real train.csv (the rest blank).
OTHER_LABELS: dict[str, tuple[float, float, float]] = {
    "Enlarged Cardiomediastinum": (0.0483, 0.0969, 0.0555),
    "Lung Opacity": (0.4726, 0.0295, 0.0251),
    "Lung Lesion": (0.0411, 0.0057, 0.0067),
    "Pneumonia": (0.027, 0.0125, 0.084),
    "Pneumothorax": (0.087, 0.2522, 0.0141),
    "Pleural Other": (0.0158, 0.0014, 0.0119),
    "Fracture": (0.0405, 0.0112, 0.0029),
    "Support Devices": (0.5192, 0.0275, 0.0048),
}
VALID_POSITIVE = {
    "Pleural Effusion": 67 / 234,
    "Edema": 45 / 234,
    "Atelectasis": 80 / 234,
    "Consolidation": 33 / 234,
    "Cardiomegaly": 68 / 234,
}


class DemoError(ChextrainError):
    """Bad arguments to write_demo (counts, size, seed)."""


@dataclass(frozen=True)
class Photo:
    rel: str  # path under out/
    recipe: str  # simulate_photo recipe
    device: str = ""  # phone folder for natural photos
    orientation: int = 1  # EXIF Orientation written (6: pixels stored turned 90 degrees)


@dataclass(frozen=True)
class Xray:
    rel: str  # path under out/, also the CSV Path cell
    cells: tuple[str, ...]  # the 18 cells after Path
    view: str  # 'PA', 'AP' or 'lateral' for the renderer
    labels: dict[str, float]
    shape: tuple[int, int]
    photos: list[Photo] = field(default_factory=list)


def _stats() -> dict:
    text = resources.files("chextrain").joinpath("resources/chexpert_label_stats.json").read_text("utf-8")
    stats = json.loads(text)
    if [SLUG_OF.get(p) for p in stats["pathologies"]] != list(SLUGS):
        raise DemoError(f"label stats list pathologies {stats['pathologies']}; expected {list(PATHOLOGIES)}")
    return stats


def _cell(value: float) -> str:
    """A CheXpert label cell: '1.0', '0.0', '-1.0' or '' (not mentioned)."""
    return "" if math.isnan(value) else f"{value:.1f}"


class Sampler:
    """Draws patients, studies, views and labels like the real train.csv (one generator)."""

    def __init__(self, rng: np.random.Generator, size: int) -> None:
        self.rng, self.size, stats = rng, size, _stats()
        states = np.array(
            [[np.nan if s == "blank" else float(s) for s in j["states"]] for j in stats["joint_counts"]]
        )
        counts = np.array([j["count"] for j in stats["joint_counts"]], dtype=float)
        self.joint, self.joint_p = states, counts / counts.sum()
        q = stats["age_quantiles"]
        self.age_q = (np.array([float(k) for k in q]), np.array([float(v) for v in q.values()]))
        sex = stats["sex"]
        unknown = max(sex.get("Unknown", 0) / sum(sex.values()), 0.001)
        known = np.array([sex["Male"], sex["Female"]], dtype=float)
        self.sex = (("Male", "Female", "Unknown"), np.append(known / known.sum() * (1 - unknown), unknown))
        ap, names = stats["ap_pa"], ("AP", "PA", "LL", "RL")
        counts = np.array([ap.get(k, 0) for k in names], dtype=float)
        self.ap_pa = (names, counts / counts.sum())

    def patient(self) -> tuple[str, float]:
        sex = str(self.rng.choice(self.sex[0], p=self.sex[1]))
        return sex, float(np.interp(self.rng.random(), *self.age_q))

    def shape(self) -> tuple[int, int]:
        return int(round(self.size * self.rng.uniform(1.12, 1.3))), self.size

    def view_names(self, valid: bool) -> list[str]:
        if valid:  # 234 images of 200 patients: a lateral in about 1 study in 6
            return ["view1_frontal"] + (["view2_lateral"] if self.rng.random() < 0.17 else [])
        n = 1 + int(self.rng.choice(len(VIEWS_P), p=VIEWS_P))
        return ["view1_frontal"] + [
            f"view{j}_{'lateral' if self.rng.random() < LATERAL_P[j] else 'frontal'}" for j in range(2, n + 1)
        ]

    def train_labels(self) -> dict[str, float]:
        """All 14 label columns (by name) for one study, encoded 1 / 0 / -1 / NaN."""
        five = self.joint[self.rng.choice(len(self.joint_p), p=self.joint_p)]
        out = dict(zip(PATHOLOGIES, five, strict=True))
        opaque = any(out[n] == 1.0 for n in ("Edema", "Consolidation", "Atelectasis"))
        for name, (p1, p0, pu) in OTHER_LABELS.items():
            if name == "Lung Opacity":  # follows the opacities drawn in the image
                p1 = 0.75 if opaque else 0.3
            out[name] = float(self.rng.choice([1.0, 0.0, -1.0, np.nan], p=[p1, p0, pu, 1 - p1 - p0 - pu]))
        findings = [n for n in LABEL_COLUMNS if n not in ("No Finding", "Support Devices")]
        out["No Finding"] = np.nan if any(out[n] in (1.0, -1.0) for n in findings) else 1.0
        return out

    def valid_labels(self) -> dict[str, float]:
        """Radiologist consensus labels: every cell 0 or 1."""
        out = {n: float(self.rng.random() < p) for n, p in VALID_POSITIVE.items()}
        for name, (p1, _, _) in OTHER_LABELS.items():
            out[name] = float(self.rng.random() < p1)
        out["No Finding"] = float(not any(out[n] for n in LABEL_COLUMNS[1:-1]))
        return out

    def xray(self, rel: str, sex: str, age: float, labels: dict[str, float]) -> Xray:
        lateral = rel.endswith("_lateral.jpg")
        ap_pa = "" if lateral else str(self.rng.choice(self.ap_pa[0], p=self.ap_pa[1]))
        view = "lateral" if lateral or ap_pa in ("LL", "RL") else ap_pa
        cells = (
            sex,
            str(int(round(age))),
            "Lateral" if lateral else "Frontal",
            ap_pa,
            *(_cell(labels[c]) for c in LABEL_COLUMNS),
        )
        slugs = {s: labels[NAME_OF[s]] for s in SLUGS} | {"support_devices": labels["Support Devices"]}
        return Xray(rel, cells, view, slugs, self.shape())


def patients(sampler: Sampler, n_images: int, first: int, split: str, valid: bool) -> list[list[Xray]]:
    """Patients (lists of x-rays) until n_images x-rays exist; the last one is cut to fit."""
    out, total, pid = [], 0, first
    studies_p = np.array(STUDIES_P) / sum(STUDIES_P)
    while total < n_images:
        sex, age = sampler.patient()
        n_studies = 1 if valid else 1 + int(sampler.rng.choice(len(STUDIES_P), p=studies_p))
        images = []
        for k in range(1, n_studies + 1):
            labels = sampler.valid_labels() if valid else sampler.train_labels()
            for name in sampler.view_names(valid):
                rel = f"{CHEXPERT_DIR}/{split}/patient{pid:05d}/study{k}/{name}.jpg"
                images.append(sampler.xray(rel, sex, min(age, 90.0), labels))
            age += float(sampler.rng.uniform(0.0, 1.5))
        images = images[: n_images - total]
        out.append(images)
        total += len(images)
        pid += 1
    return out
