"""The five pathologies, CheXpert's column names, and uncertainty policies.

The catalog keeps raw label values (1, 0, -1, NaN); a policy turns them into training
targets and a mask here, never inside a reader.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

# The paper's order; every artifact stores these names alongside any array.
PATHOLOGIES: tuple[str, ...] = (
    "Pleural Effusion",
    "Edema",
    "Atelectasis",
    "Consolidation",
    "Cardiomegaly",
)
SLUGS: tuple[str, ...] = tuple(p.lower().replace(" ", "_") for p in PATHOLOGIES)
SLUG_OF: dict[str, str] = dict(zip(PATHOLOGIES, SLUGS, strict=True))
NAME_OF: dict[str, str] = dict(zip(SLUGS, PATHOLOGIES, strict=True))

# The 19-column header shared by CheXpert and CheXphoto train.csv / valid.csv.
CHEXPERT_COLUMNS: tuple[str, ...] = (
    "Path",
    "Sex",
    "Age",
    "Frontal/Lateral",
    "AP/PA",
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)
LABEL_COLUMNS: tuple[str, ...] = CHEXPERT_COLUMNS[5:]

POLICIES: tuple[str, ...] = ("ones", "zeros", "ignore")
Policy = str | Mapping[str, str]


def resolve_policy(policy: Policy) -> dict[str, str]:
    """Return {slug: policy} for the five pathologies.

    `policy` is one of POLICIES, or a mapping from pathology (name or slug) to a policy,
    with an optional `default` key (else `ones`, the paper's U-Ones).
    """
    if isinstance(policy, str):
        if policy not in POLICIES:
            raise ValueError(f"policy {policy!r} is not one of {list(POLICIES)}")
        return {s: policy for s in SLUGS}
    out: dict[str, str] = {}
    default = policy.get("default", "ones")
    if default not in POLICIES:
        raise ValueError(f"policy default {default!r} is not one of {list(POLICIES)}")
    for key, value in policy.items():
        if key == "default":
            continue
        slug = SLUG_OF.get(key, key)
        if slug not in SLUGS:
            raise ValueError(f"policy names unknown pathology {key!r}; expected one of {list(SLUGS)}")
        if value not in POLICIES:
            raise ValueError(f"policy for {key!r} is {value!r}; expected one of {list(POLICIES)}")
        out[slug] = value
    return {s: out.get(s, default) for s in SLUGS}


def apply_policy(raw: pd.DataFrame | np.ndarray, policy: Policy = "ones") -> tuple[np.ndarray, np.ndarray]:
    """Turn raw labels into (targets, mask), both float32 N x 5 in PATHOLOGIES order.

    raw: the catalog (columns named by SLUGS) or an N x 5 array of 1/0/-1/NaN.
    Blank (NaN) means "not mentioned": target 0, mask 1, as in CheXpert's reference code.
    Uncertain (-1) -> 1 under `ones`, 0 under `zeros`, masked out (mask 0) under `ignore`.
    """
    values = raw[list(SLUGS)].to_numpy(dtype=np.float32) if isinstance(raw, pd.DataFrame) else raw
    values = np.asarray(values, dtype=np.float32)  # N x 5
    if values.ndim != 2 or values.shape[1] != len(SLUGS):
        raise ValueError(f"raw labels must be N x {len(SLUGS)}; got shape {values.shape}")
    per = resolve_policy(policy)
    targets = np.nan_to_num(values, nan=0.0).astype(np.float32)
    mask = np.ones_like(targets)
    for j, slug in enumerate(SLUGS):
        uncertain = values[:, j] == -1
        if per[slug] == "ones":
            targets[uncertain, j] = 1.0
        elif per[slug] == "zeros":
            targets[uncertain, j] = 0.0
        else:
            targets[uncertain, j] = 0.0
            mask[uncertain, j] = 0.0
    return targets, mask
