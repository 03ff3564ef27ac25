"""The two views of the phantom renderer (data/phantom.py): anatomy and pathology signs.

`draw_frontal` (PA/AP) and `draw_lateral` lay out the thorax, heart, lungs and bones in the
patient frame of data/phantom_frame.py and add each pathology sign with its label's strength. They
draw no random numbers: every uniform comes from the `Patient`, so the labels never change the
patient.
"""

from __future__ import annotations

import math

import numpy as np

from chextrain.data.phantom_frame import (
    EXTRA_SLUGS,
    F32,
    Canvas,
    Patient,
    bands,
    ellipse,
    lerp,
    ramp,
    segment_distance,
)
from chextrain.labels import SLUGS

CTR_RANGES: dict[str, tuple[float, float]] = {
    "absent": (0.38, 0.48),
    "uncertain": (0.495, 0.53),
    "positive": (0.56, 0.66),
}


def _strength(state: str, t: float) -> float:
    return {"absent": 0.0, "uncertain": lerp(0.3, 0.45, t), "positive": 1.0}[state]


def _bronchograms(
    u: np.ndarray, v: np.ndarray, hilum: tuple[float, float], phase: float, width: float, e: float
) -> np.ndarray:
    """A fan of thin air-filled tubes radiating from a hilum (dark lines inside an opacity)."""
    du, dv = u - hilum[0], v - hilum[1]
    r = np.sqrt(du * du + dv * dv) + 1e-3
    theta = np.arctan2(dv, du)
    step = 0.45  # radians between branches
    y = theta * (1.0 / step) + phase
    d = r * np.abs(y - np.floor(y) - 0.5) * step
    return ramp(width * np.clip(1.4 - r, 0.3, 1.0) - d, e)


def _focal(
    cv: Canvas,
    acc: np.ndarray,
    masks: dict[str, np.ndarray],
    st: dict[str, str],
    k: dict[str, float],
    g: dict[str, np.ndarray],
    lungs: np.ndarray,
    region: np.ndarray,
    n_med: np.ndarray,
    lobe: tuple[float, float, float],
    hilum: tuple[float, float],
    plate: tuple[float, float],
) -> None:
    """Consolidation: a dense patchy opacity around `lobe` (u, v, fissure: cut below v = fissure)
    with air bronchograms when positive. Atelectasis: a plate-like band at `plate` (within region)."""
    gc, ga = g["consolidation"], g["atelectasis"]
    rad = lerp(0.28, 0.42, gc[4]) if st["consolidation"] == "positive" else lerp(0.14, 0.2, gc[4])
    cu, cv_ = lobe[0] + lerp(-0.08, 0.08, gc[2]), lobe[1] + lerp(-0.08, 0.08, gc[3])
    b = cv.box(cu - 2 * rad, cu + 2 * rad, cv_ - 1.7 * rad, cv_ + 1.7 * rad)
    u, v = cv.uv(b)
    dist = np.sqrt(((u - cu) * (1 / 1.2)) ** 2 + (v - cv_) ** 2) * (1.0 / rad)
    patch = np.clip((1.0 - dist + 0.3 * n_med[b]) * 2.5, 0.0, 1.0) * ramp(lobe[2] - v, cv.e) * lungs[b]
    dens = 0.42 * patch
    if st["consolidation"] == "positive":
        dens -= 0.25 * patch * _bronchograms(u, v, hilum, float(gc[5]), max(0.015, 0.6 / cv.p.s), cv.e)
    _add(acc, masks, "consolidation", k["consolidation"], dens, b)
    half, angle = lerp(0.15, 0.25, ga[6]), math.radians(lerp(-15, 15, ga[5]))
    du, dv = half * math.cos(angle), half * math.sin(angle)
    b = cv.box(plate[0] - half - 0.1, plate[0] + half + 0.1, plate[1] - 0.2, plate[1] + 0.2)
    d = segment_distance(*cv.uv(b), (plate[0] - du, plate[1] - dv), (plate[0] + du, plate[1] + dv))
    thick = max(lerp(0.025, 0.035, ga[7]), 0.8 / cv.p.s)
    _add(acc, masks, "atelectasis", k["atelectasis"], 0.4 * ramp(thick - d, cv.e) * region[b], b)


def _add(
    dens_map: np.ndarray,
    masks: dict[str, np.ndarray],
    slug: str,
    k: float,
    dens: np.ndarray,
    b: tuple[slice, slice] | None = None,
) -> None:
    """Add a sign's density `dens` (over box b) times its strength, recording where it shows."""
    b = b or (slice(None), slice(None))
    masks[slug] = np.zeros(dens_map.shape, dtype=bool)
    if k > 0:
        dens_map[b] += k * dens
        masks[slug][b] = k * dens > 0.02


def draw_frontal(st: dict[str, str], p: Patient, shape: tuple[int, int], ap: bool) -> tuple:
    """A PA or AP view. Returns (density, canvas, geometry masks, sign masks, strengths, params)."""
    cv = Canvas(p, shape)
    u, v, e = cv.u, cv.v, cv.e
    r, g = p.r, p.signs
    n_coarse, n_med, n_fine = p.noise
    k = {s: _strength(st[s], g[s][0]) for s in (*SLUGS, *EXTRA_SLUGS)}

    # -- geometry; volume loss and heart size follow the labels, their uniforms do not --
    atel = st["atelectasis"]
    atel_side = -1.0 if g["atelectasis"][1] < 0.6 else 1.0
    cp = {-1.0: lerp(0.76, 0.86, r[0]) - 0.07 * ap}
    cp[1.0] = cp[-1.0] + lerp(0.02, 0.08, r[1])  # the left hemidiaphragm sits lower
    loss = {"absent": 0.0, "uncertain": 0.04, "positive": lerp(0.13, 0.2, g["atelectasis"][2])}
    cp[atel_side] -= loss[atel]
    hd = lerp(0.22, 0.32, r[2])
    mid = lerp(-0.03, 0.05, r[3]) + 0.06 * atel_side * (atel == "positive")  # shifts toward collapse
    left = ramp(u - mid, 0.03)  # the patient's left: image right
    au = np.abs(u - mid)
    cp_map = cp[-1.0] + (cp[1.0] - cp[-1.0]) * left
    dome = cp_map - hd * np.clip(1.0 - ((au - 0.45) * (1 / 0.6)) ** 2, 0.0, 1.0)  # diaphragm, per u
    above = ramp(dome - v, e)
    vv = np.minimum(v, 0.75) - 0.75
    prof = np.sqrt(np.clip(1.0 - (vv * (1 / 1.9)) ** 2, 0.0, 1.0))  # rib cage half-width at v
    thorax = ramp(prof - au, e) * ramp(v + 1.15, e) * ramp(cp_map - v, e)
    ctr = lerp(*CTR_RANGES[st["cardiomegaly"]], g["cardiomegaly"][1])
    tilt, q, f = math.radians(lerp(20, 35, r[4])), lerp(0.7, 0.85, r[5]), lerp(0.3, 0.36, r[6])
    ha = ctr / math.sqrt(math.cos(tilt) ** 2 + (q * math.sin(tilt)) ** 2)  # u-extent is exactly 2 ctr
    vext = math.sqrt((ha * math.sin(tilt)) ** 2 + (q * ha * math.cos(tilt)) ** 2)
    hc = (mid + (1.0 - 2.0 * f) * ctr, cp[1.0] - hd - 0.35 * vext)
    bh = cv.box(hc[0] - ctr - 0.1, hc[0] + ctr + 0.1, hc[1] - vext - 0.1, hc[1] + vext + 0.1)
    heart = np.zeros(shape, F32)
    heart[bh] = ellipse(*cv.uv(bh), hc, (ha, q * ha), e, tilt)
    mw = lerp(0.1, 0.14, r[7])
    med = ramp(mw + 0.07 * ramp(-0.7 - v, 0.2) - au, e) * ramp(hc[1] - v, e)
    knob = cv.box(mid, mid + 0.35, -0.7, -0.35)
    med[knob] = np.maximum(med[knob], ellipse(*cv.uv(knob), (mid + mw + 0.03, -0.55), (0.08, 0.08), e))
    sil = np.maximum(heart, med)
    lungs = thorax * above * (1.0 - sil)

    # -- anatomy densities: soft tissue, air, bone --
    bw = lerp(1.18, 1.3, r[8])
    vs = np.minimum(v + 1.0, 0.0)  # rounded shoulders above v = -1
    wb = bw - 0.35 + np.sqrt(np.clip(0.35**2 - vs * vs, 0.0, None)) + 0.04 * np.maximum(v, 0.0)
    body = np.maximum(ramp(wb - au, 2 * e) * ramp(v + 1.33, 2 * e), ramp(0.32 - au, 2 * e))
    path = np.sqrt(np.clip(1.0 - (au * (1.0 / bw)) ** 2, 0.0, 1.0))  # tissue thickness across
    A = 0.03 + body * (0.26 + 0.22 * path + 0.03 * n_coarse)
    A += 0.1 * (1.0 - above) * thorax + 0.08 * sil
    A -= lungs * (0.31 + 0.03 * n_coarse)
    hil = np.exp(-(((au - 0.28) * (1 / 0.35)) ** 2) - (((v + 0.05) * 2.0) ** 2))
    A += lungs * (0.06 * hil + 0.05 * np.maximum(n_fine, 0.0) * (0.3 + hil))  # vessels
    tb = cv.box(mid - 0.1, mid + 0.1, -1.5, -0.3)
    A[tb] -= 0.1 * ramp(0.05 - np.abs(cv.u[tb] - mid), e) * ramp(-0.35 - cv.v[tb], e)  # trachea
    rb = cv.box(-1.4 + mid, 1.4 + mid, -1.3, 0.95)
    ur, vr = cv.uv(rb)
    aur = au[rb]
    ribs = bands(vr + 0.3 * aur - 0.65 * aur**2 - lerp(0.0, 0.17, r[9]), 0.18, 0.04, e)
    ribs *= ramp(prof[rb] + 0.1 - aur, e) * ramp(aur - 0.1, e) * ramp(0.6 - vr, 0.15)
    A[rb] += (
        0.09 * ribs + 0.04 * bands(vr - 0.45 * (1.0 - aur) - lerp(0.0, 0.2, r[10]), 0.2, 0.03, e) * thorax[rb]
    )
    sb = cv.box(mid * 0.5 - 0.12, mid * 0.5 + 0.12, -1.6, 1.6)
    us, vsp = cv.uv(sb)
    A[sb] += ramp(0.085 - np.abs(us - mid * 0.5), e) * (0.04 + 0.04 * bands(vsp, 0.14, 0.05, e))
    for sd in (-1.0, 1.0):
        drop = lerp(0.05, 0.2, r[11]) * (0.4 if ap else 1.0)
        b = cv.box(mid + sd * 0.05, mid + sd * 1.0, -1.45, -0.9)
        ub, vb = cv.uv(b)
        clav = segment_distance(ub, vb, (mid + sd * 0.1, -1.0), (mid + sd * 0.95, -1.05 - drop))
        A[b] += 0.16 * ramp(0.045 - clav, e)
        b = cv.box(mid + sd * (bw - 0.12) - 0.2, mid + sd * (bw - 0.12) + 0.2, -1.25, -0.85)
        A[b] += 0.14 * ellipse(*cv.uv(b), (mid + sd * (bw - 0.12), -1.05), (0.16, 0.16), e)  # humeral heads
        if ap:  # scapulae project over the upper lungs on AP films
            b = cv.box(mid + sd * 0.95 - 0.3, mid + sd * 0.95 + 0.3, -1.05, 0.0)
            A[b] += 0.05 * ellipse(*cv.uv(b), (mid + sd * 0.95, -0.5), (0.28, 0.5), 3 * e)
        if r[12] < 0.4:  # breast shadows
            b = cv.box(mid + sd * 0.62 - 0.5, mid + sd * 0.62 + 0.5, cp[sd] - 0.4, cp[sd] + 0.3)
            A[b] += 0.07 * ellipse(*cv.uv(b), (mid + sd * 0.62, cp[sd] - 0.05), (0.45, 0.3), 0.08)

    # -- pathology signs --
    masks: dict[str, np.ndarray] = {}
    ge = g["pleural_effusion"]
    sides = [(-1.0,), (1.0,), (-1.0, 1.0)][0 if ge[1] < 0.3 else 1 if ge[1] < 0.5 else 2]
    h = lerp(0.3, 0.5, ge[2]) if st["pleural_effusion"] == "positive" else lerp(0.1, 0.14, ge[2])
    b = cv.box(mid - 1.2, mid + 1.2, min(cp.values()) - h - 0.6, max(cp.values()) + 0.1)
    vb, aub, lb = cv.v[b], au[b], left[b]
    c = np.clip((aub - 0.15) * (1 / 0.85), 0.0, 1.0)
    men = cp_map[b] - h * (0.3 + 0.7 * c * np.sqrt(c))
    on = lb if sides == (1.0,) else 1.0 - lb if sides == (-1.0,) else 1.0
    _add(
        A,
        masks,
        "pleural_effusion",
        k["pleural_effusion"],
        0.45 * np.clip((vb - men) * 10.0 + 0.5, 0.0, 1.0) * on * thorax[b] * above[b],
        b,
    )
    dens = lerp(0.17, 0.26, g["edema"][2]) * hil * (0.8 + 0.2 * n_med) * lungs  # perihilar bat-wing haze
    if st["edema"] == "positive":  # Kerley B lines: short horizontal lines at the lung bases
        b = cv.box(mid - 1.1, mid + 1.1, 0.15, max(cp.values()) + 0.05)
        vb = v[b]
        dens[b] += (
            0.15
            * lungs[b]
            * ramp(au[b] - prof[b] + 0.2, 0.03)
            * ramp(vb - 0.25, 0.05)
            * bands(vb, 0.06, max(0.006, 0.3 / p.s), e)
        )
    _add(A, masks, "edema", k["edema"], dens)
    lobes = ((-0.5, -0.55, -0.15), (-0.35, 0.1, 9.0), (-0.6, 0.4, 9.0), (0.5, -0.45, 0.0), (0.6, 0.4, 9.0))
    lu, lv, fis = lobes[int(g["consolidation"][1] * 5) % 5]
    ga = g["atelectasis"]
    _focal(
        cv,
        A,
        masks,
        st,
        k,
        g,
        lungs,
        thorax * above,
        n_med,
        (mid + lu, lv, fis),
        (mid + math.copysign(0.25, lu), -0.05),
        (mid + atel_side * lerp(0.4, 0.65, ga[3]), cp[atel_side] - lerp(0.32, 0.45, ga[4])),
    )
    masks["cardiomegaly"] = (heart > 0.5) & (st["cardiomegaly"] != "absent")
    if k["support_devices"] > 0.5:  # a right subclavian line into the SVC, and ECG electrodes
        gs = g["support_devices"]
        pts = ((mid - 0.75, -1.5), (mid - 0.25, -0.98), (mid + 0.02, lerp(-0.5, -0.2, gs[1])))
        for a, c in zip(pts[:-1], pts[1:], strict=True):
            b = cv.box(
                min(a[0], c[0]) - 0.05, max(a[0], c[0]) + 0.05, min(a[1], c[1]) - 0.05, max(a[1], c[1]) + 0.05
            )
            A[b] += 0.45 * ramp(max(0.012, 0.5 / p.s) - segment_distance(*cv.uv(b), a, c), e)
        for j in range(3):
            c = (lerp(-1.1, 1.1, gs[2 + j]), lerp(-0.9, 0.3, gs[5 + j]))
            b = cv.box(c[0] - 0.07, c[0] + 0.07, c[1] - 0.07, c[1] + 0.07)
            A[b] += 0.5 * ellipse(*cv.uv(b), c, (0.05, 0.05), e)
    costo = (thorax > 0.5) & (au > 0.6) & (v > cp_map - 0.45) & (v < cp_map)
    geo = {
        "body": body > 0.5,
        "thorax": thorax > 0.5,
        "lungs": lungs > 0.5,
        "heart": heart > 0.5,
        "costophrenic": costo,
    }
    return A, cv, geo, masks, k, {"ctr_nominal": ctr, "cp_right": cp[-1.0], "cp_left": cp[1.0], "dome": hd}


def draw_lateral(st: dict[str, str], p: Patient, shape: tuple[int, int]) -> tuple:
    """A lateral view, patient facing image left: sternum left, spine right, heart anterior."""
    cv = Canvas(p, shape)
    u, v, e = cv.u, cv.v, cv.e
    r, g = p.r, p.signs
    n_coarse, n_med, n_fine = p.noise
    k = {s: _strength(st[s], g[s][0]) for s in (*SLUGS, *EXTRA_SLUGS)}
    atel = st["atelectasis"]
    cp = (
        lerp(0.72, 0.84, r[0])
        - {"absent": 0.0, "uncertain": 0.03, "positive": lerp(0.09, 0.13, g["atelectasis"][2])}[atel]
    )
    hd = lerp(0.22, 0.32, r[2])
    dome = cp - hd * np.clip(1.0 - ((u + 0.1) * (1 / 0.95)) ** 2, 0.0, 1.0) + 0.14 * np.maximum(u, 0.0)
    above = ramp(dome - v, e)
    cavity = ellipse(u, v, (0.02, -0.05), (0.95, 1.12), e)
    ctr = lerp(*CTR_RANGES[st["cardiomegaly"]], g["cardiomegaly"][1])
    ha = ctr * 0.97  # heart depth / chest depth = ctr (the cavity is 1.94 deep)
    hb = ha * lerp(0.8, 0.95, r[5])
    hc = (-0.9 + ha, cp - hd * 0.75 - 0.2 * hb)
    heart = ellipse(u, v, hc, (ha, hb), e, math.radians(lerp(-10, 10, r[4])))
    lungs = cavity * above * (1.0 - heart)
    x = ((u - 0.08) * (1 / 1.22)) ** 2
    y = ((v - 0.3) * (1 / 1.75)) ** 2
    body = ramp(1.0 - x * x - y * y, 0.05) * ramp(v + 1.3, 2 * e)  # rounded box
    body = np.maximum(body, ramp(0.45 - np.abs(u - 0.15), 2 * e))  # neck
    A = 0.04 + body * (0.5 + 0.03 * n_coarse) + 0.08 * (1.0 - above) * cavity + 0.08 * heart
    A -= lungs * (0.29 + 0.03 * n_coarse)
    hil = np.exp(-(((u - 0.05) * 2.5) ** 2) - (((v + 0.05) * 2.5) ** 2))
    A += lungs * (0.06 * hil + 0.04 * np.maximum(n_fine, 0.0) * (0.3 + hil))
    b = cv.box(-0.25, 0.15, -1.5, -0.25)
    A[b] -= 0.1 * ramp(0.04 - segment_distance(*cv.uv(b), (-0.15, -1.4), (0.05, -0.3)), e)  # trachea
    b = cv.box(-0.25, 0.35, -0.75, -0.4)
    ub, vb = cv.uv(b)
    A[b] += (
        0.06
        * ramp(0.04 - np.abs(np.sqrt((ub - 0.05) ** 2 + (vb + 0.45) ** 2) - 0.22), e)
        * ramp(-0.45 - vb, e)
    )  # aortic arch
    us = lerp(0.74, 0.84, r[3])
    b = cv.box(us - 0.35, us + 0.4, -1.8, 1.8)
    ub, vb = cv.uv(b)
    usv = us - 0.06 * vb * vb  # kyphosis
    A[b] += 0.2 * ramp(0.1 - np.abs(ub - usv), e) * bands(vb, 0.16, 0.06, e) + 0.06 * ramp(
        0.1 - np.abs(ub - usv - 0.2), e
    )  # vertebral bodies and posterior elements
    b = cv.box(-1.0, -0.8, -0.95, 0.45)
    A[b] += 0.15 * ramp(0.025 - segment_distance(*cv.uv(b), (-0.95, -0.85), (-0.88, 0.35)), e)  # sternum
    if r[12] < 0.6:  # raised arms: humeri over the upper chest
        b = cv.box(-0.9, 0.1, -1.9, -0.8)
        A[b] += 0.15 * ramp(0.09 - segment_distance(*cv.uv(b), (-0.05, -0.95), (-0.75, -1.8)), 2 * e)
    masks: dict[str, np.ndarray] = {}
    h = lerp(0.3, 0.5, g["pleural_effusion"][2]) if st["pleural_effusion"] == "positive" else 0.12
    c = np.clip((u + 0.2) * (1 / 1.1), 0.0, 1.0)
    men = dome - h * (0.2 + 0.8 * c * np.sqrt(c))
    _add(
        A,
        masks,
        "pleural_effusion",
        k["pleural_effusion"],
        0.4 * np.clip((v - men) * 10.0 + 0.5, 0.0, 1.0) * cavity * above * ramp(u + 0.2, 0.1),
    )
    haze = np.exp(-(((u - 0.05) * (1 / 0.55)) ** 2) - (((v + 0.05) * 2.0) ** 2)) * (0.8 + 0.2 * n_med)
    _add(A, masks, "edema", k["edema"], lerp(0.17, 0.26, g["edema"][2]) * haze * lungs)
    lobes = ((-0.35, -0.5), (-0.45, 0.15), (0.45, 0.35), (0.35, -0.35), (0.2, 0.45))
    lu, lv = lobes[int(g["consolidation"][1] * 5) % 5]
    ga = g["atelectasis"]
    _focal(
        cv,
        A,
        masks,
        st,
        k,
        g,
        lungs,
        cavity * above,
        n_med,
        (lu, lv, 9.0),
        (0.05, -0.05),
        (lerp(-0.3, 0.4, ga[3]), cp - lerp(0.35, 0.5, ga[4])),
    )
    masks["cardiomegaly"] = (heart > 0.5) & (st["cardiomegaly"] != "absent")
    if k["support_devices"] > 0.5:
        b = cv.box(-0.4, 0.05, -1.6, -0.2)
        A[b] += 0.45 * ramp(
            max(0.012, 0.5 / p.s) - segment_distance(*cv.uv(b), (-0.3, -1.5), (-0.05, -0.3)), e
        )
    costo = (cavity > 0.5) & (u > 0.3) & (v > dome - 0.45) & (v < dome)
    geo = {
        "body": body > 0.5,
        "thorax": (cavity * above) > 0.5,
        "lungs": lungs > 0.5,
        "heart": heart > 0.5,
        "costophrenic": costo,
    }
    return A, cv, geo, masks, k, {"ctr_nominal": ctr, "cp": cp, "dome": hd}
