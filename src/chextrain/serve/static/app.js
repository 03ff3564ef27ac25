// chextrain page: upload an image, show the findings, then the saliency maps. No external resources.
//
// A photo is shrunk on the device before upload: decoded with its EXIF orientation applied
// (createImageBitmap, imageOrientation "from-image"), drawn on a canvas at most MAX_SIDE px on its
// long side and sent as JPEG. What the browser cannot decode (DICOM, HEIC) goes as it is, and the
// server renders its preview. The upload size is checked against the server's limit first.
//
// A photo's answer carries the radiograph's outline (`quad`: corners TL, TR, BR, BL in the uploaded
// image's pixels). It is drawn over the preview (an SVG whose viewBox is the image's pixels) with a
// handle on each corner, dragged with pointer events (mouse, touch, pen); "Score again with this
// outline" sends the same prepared file with the corners, and the server scores the radiograph
// inside them, flattened.
"use strict";

const MAX_SIDE = 2048;  // px on the long side sent to the server
const $ = (id) => document.getElementById(id);
let maxUploadBytes = null;  // from /api/health
const CORNER_NAMES = ["top-left", "top-right", "bottom-right", "bottom-left"];
// What was sent and the outline shown: {blob, corners: [[x, y] x 4], width, height, method}.
const current = { blob: null, corners: null, width: 0, height: 0, method: null };

function show(id, on) { $(id).toggleAttribute("hidden", !on); }  // HTML and SVG elements alike

function setStatus(text) { $("status").textContent = text; }

function showError(text) {
  $("error").textContent = text;
  show("error", Boolean(text));
}

function mb(bytes) { return (bytes / (1024 * 1024)).toFixed(1) + " MB"; }

async function post(path, file, corners) {
  const form = new FormData();
  form.append("file", file, file.name || "image");
  if (corners) form.append("corners", corners.map((c) => c[0].toFixed(1) + "," + c[1].toFixed(1)).join(","));
  const response = await fetch(path, { method: "POST", body: form });
  let body;
  try { body = await response.json(); } catch (e) { body = { detail: response.statusText }; }
  if (!response.ok) throw new Error(body.detail || body.error || ("HTTP " + response.status));
  return body;
}

// {blob, drawable, note}: the file to upload, whether the browser can show it, what was done to it.
async function prepare(file) {
  let bitmap;
  try {
    bitmap = await createImageBitmap(file, { imageOrientation: "from-image" });
  } catch (e) {
    return { blob: file, drawable: false, note: "" };  // DICOM, HEIC...: the server decodes it
  }
  const long = Math.max(bitmap.width, bitmap.height);
  if (long <= MAX_SIDE) {
    bitmap.close();
    return { blob: file, drawable: true, note: "" };
  }
  const scale = MAX_SIDE / long;
  const canvas = document.createElement("canvas");
  canvas.width = Math.max(1, Math.round(bitmap.width * scale));
  canvas.height = Math.max(1, Math.round(bitmap.height * scale));
  canvas.getContext("2d").drawImage(bitmap, 0, 0, canvas.width, canvas.height);
  const note = "Shrunk from " + bitmap.width + " x " + bitmap.height + " to " + canvas.width + " x " +
    canvas.height + " px before upload.";
  bitmap.close();
  const blob = await new Promise((resolve) => canvas.toBlob(resolve, "image/jpeg", 0.92));
  if (!blob) throw new Error("this browser could not shrink the photo");
  return { blob: new File([blob], "photo.jpg", { type: "image/jpeg" }), drawable: true, note };
}

function checkSize(blob) {
  if (maxUploadBytes !== null && blob.size > maxUploadBytes) {
    throw new Error("the file is " + mb(blob.size) + " and the server accepts at most " + mb(maxUploadBytes) +
      ". Choose a smaller file or take a photo instead.");
  }
}

function pct(p) { return (100 * p).toFixed(1) + "%"; }

function renderRoute(r) {
  const router = r.p_photo === null ? "no router" : "P(photo) = " + r.p_photo.toFixed(2);
  const how = { router: "chosen by the router", forced: "chosen by the server", "single-head": "the only head" };
  $("route").textContent = "Head used: " + r.head + " (" + (how[r.domain_source] || r.domain_source) +
    "; " + router + ")";
}

function renderWarnings(r) {
  const box = $("ood");
  const lines = r.warnings.slice();
  if (r.ood.status === "uncalibrated") lines.push("This model has no out-of-distribution check.");
  box.textContent = "";
  for (const line of lines) {
    const p = document.createElement("p");
    p.textContent = (r.flagged ? "Warning: " : "") + line;
    box.appendChild(p);
  }
  box.className = r.flagged ? "warning" : "note";
  show("ood", lines.length > 0);
}

// A withheld image (flagged: OOD, unsure router, poor photo) gets its reason first and its
// probabilities greyed out, with no finding marked positive.
function renderBars(r) {
  const list = $("bars");
  list.textContent = "";
  $("withheld").textContent = r.withheld ? "Not scored: " + r.withheld_reason +
    ". The model cannot judge this image; the numbers below are shown greyed out for reference only." : "";
  show("withheld", r.withheld);
  list.classList.toggle("withheld", r.withheld);
  const findings = r.withheld ? r.withheld_pathologies : r.pathologies;
  for (const [slug, v] of Object.entries(findings)) {
    const li = document.createElement("li");
    li.dataset.slug = slug;
    li.className = r.withheld ? "withheld" : (v.positive ? "positive" : "negative");
    const label = document.createElement("div");
    label.className = "label";
    const name = document.createElement("span");
    name.textContent = v.name;
    const prob = document.createElement("span");
    prob.className = "prob";
    prob.textContent = pct(v.prob) + (!r.withheld && v.positive ? " (positive)" : "");
    label.append(name, prob);
    const track = document.createElement("div");
    track.className = "track";
    track.title = "threshold " + pct(v.threshold);
    const fill = document.createElement("div");
    fill.className = "fill";
    fill.style.width = pct(v.prob);
    const mark = document.createElement("div");
    mark.className = "threshold";
    mark.style.left = pct(v.threshold);
    track.append(fill, mark);
    li.append(label, track);
    list.appendChild(li);
  }
}

// The photo checks: on failure the retake advice first, then each check's verdict.
function renderQuality(r) {
  const box = $("quality");
  box.textContent = "";
  const q = r.quality;
  show("quality", Boolean(q));
  if (!q) return;
  box.className = q.passed ? "note" : "retake";
  const head = document.createElement("p");
  head.className = "advice";
  head.textContent = q.passed ? "Photo quality: good." : q.retake;
  const list = document.createElement("ul");
  for (const [name, c] of Object.entries(q.checks)) {
    const li = document.createElement("li");
    li.dataset.check = name;
    li.className = c.verdict;
    li.textContent = name + ": " + (c.verdict === "pass" ? "ok" : c.advice);
    list.appendChild(li);
  }
  box.append(head, list);
}

function renderHeatmaps(r) {
  const box = $("heatmaps");
  box.textContent = "";
  const how = r.saliency || {};
  $("saliency-method").textContent = how.method === "gradient" ? "gradients" :
    "Grad-CAM" + (how.cells ? ", " + how.cells[0] + " x " + how.cells[1] + " cells" : "");
  $("saliency-note").textContent = how.note || "";
  show("saliency-note", Boolean(how.note));
  const findings = r.withheld ? r.withheld_pathologies : r.pathologies;
  for (const [slug, png] of Object.entries(r.heatmaps)) {
    const v = findings[slug];
    const fig = document.createElement("figure");
    const img = document.createElement("img");
    img.src = "data:image/png;base64," + png;
    img.alt = (how.method === "gradient" ? "gradient map" : "Grad-CAM heatmap") + " for " + v.name;
    img.dataset.slug = slug;
    const cap = document.createElement("figcaption");
    if (r.withheld) {
      cap.textContent = v.name + " (not scored)";
    } else {
      const positive = v.prob >= v.threshold;
      fig.className = positive ? "positive" : "negative";
      cap.textContent = v.name + " " + pct(v.prob) + (positive ? " >= " : " < ") + pct(v.threshold) +
        ": " + (positive ? "positive" : "negative");
    }
    fig.append(img, cap);
    const blank = how.notes && how.notes[slug];
    if (blank) {
      const note = document.createElement("p");
      note.className = "blank";
      note.textContent = blank;
      fig.appendChild(note);
    }
    box.appendChild(fig);
  }
}

// The preview fits the page: at most 24rem wide and 60% of the screen high (small images grow, so
// that the corners can be dragged with a finger).
function fitPreview() {
  const img = $("preview");
  if (!img.naturalWidth) return;
  const room = Math.min($("frame").parentElement.clientWidth, 384);
  if (!room) return;  // not shown yet: fitted again when the result appears
  const width = Math.min(room, 0.6 * window.innerHeight * img.naturalWidth / img.naturalHeight);
  $("frame").style.width = Math.round(width) + "px";
}

function drawOutline() {
  const shape = $("outline-shape");
  shape.setAttribute("points", current.corners.map((c) => c[0] + "," + c[1]).join(" "));
  for (const handle of document.querySelectorAll("#frame .handle")) {
    const [x, y] = current.corners[Number(handle.dataset.index)];
    handle.style.left = (100 * x / current.width) + "%";
    handle.style.top = (100 * y / current.height) + "%";
  }
}

function outlineNote(method, confidence) {
  if (method === "none") {
    return "No radiograph edge was found, so the whole photo was used. If the radiograph is there, " +
      "drag the corners onto its corners and score again.";
  }
  if (method === "user") {
    return "Scored on the radiograph inside your outline, flattened. Drag the corners and score " +
      "again to change it.";
  }
  const sure = confidence === null ? "" : " (confidence " + Math.round(100 * confidence) + "%)";
  return "The outline is the radiograph we found" + sure + ". If it is wrong, drag the corners " +
    "onto the radiograph's corners and score again.";
}

// Drag a corner: the handle keeps the pointer (setPointerCapture) until it is released.
function startDrag(event) {
  const handle = event.currentTarget;
  const index = Number(handle.dataset.index);
  event.preventDefault();
  handle.setPointerCapture(event.pointerId);
  const move = (e) => {
    const box = $("frame").getBoundingClientRect();
    const fx = Math.min(1, Math.max(0, (e.clientX - box.left) / box.width));
    const fy = Math.min(1, Math.max(0, (e.clientY - box.top) / box.height));
    current.corners[index] = [fx * current.width, fy * current.height];
    drawOutline();
  };
  const end = () => {
    handle.removeEventListener("pointermove", move);
    handle.removeEventListener("pointerup", end);
    handle.removeEventListener("pointercancel", end);
    $("rescore").disabled = false;
  };
  handle.addEventListener("pointermove", move);
  handle.addEventListener("pointerup", end);
  handle.addEventListener("pointercancel", end);
}

// Arrow keys move a focused corner by 1% of the image's side (5% with Shift).
const ARROWS = { ArrowLeft: [-1, 0], ArrowRight: [1, 0], ArrowUp: [0, -1], ArrowDown: [0, 1] };
function nudge(event) {
  const step = ARROWS[event.key];
  if (!step) return;
  event.preventDefault();
  const index = Number(event.currentTarget.dataset.index);
  const k = event.shiftKey ? 0.05 : 0.01;
  const [x, y] = current.corners[index];
  current.corners[index] = [Math.min(current.width, Math.max(0, x + step[0] * k * current.width)),
    Math.min(current.height, Math.max(0, y + step[1] * k * current.height))];
  drawOutline();
}

function clearOutline() {
  for (const handle of document.querySelectorAll("#frame .handle")) handle.remove();
  show("outline", false);
  show("outline-note", false);
  show("rescore", false);
  current.corners = null;
}

// The outline of a photo's answer (r.quad), or nothing for a digital x-ray.
function renderOutline(r) {
  clearOutline();
  const q = r.quad;
  if (!q) return;
  Object.assign(current, { corners: q.corners.map((c) => c.slice()), width: q.width, height: q.height,
    method: q.method });
  $("outline").setAttribute("viewBox", "0 0 " + q.width + " " + q.height);
  CORNER_NAMES.forEach((name, i) => {
    const handle = document.createElement("div");
    handle.className = "handle";
    handle.dataset.index = String(i);
    handle.dataset.corner = name;
    handle.title = "drag the " + name + " corner";
    handle.tabIndex = 0;
    handle.setAttribute("role", "button");
    handle.setAttribute("aria-label", name + " corner of the radiograph: drag it, or move it with the arrow keys");
    handle.addEventListener("pointerdown", startDrag);
    handle.addEventListener("keydown", nudge);
    $("frame").appendChild(handle);
  });
  drawOutline();
  $("outline-note").textContent = outlineNote(q.method, q.confidence);
  show("outline", true);
  show("outline-note", true);
  show("rescore", true);
  $("rescore").disabled = false;
}

function renderPrediction(r) {
  renderRoute(r);
  renderWarnings(r);
  renderQuality(r);
  renderBars(r);
  renderOutline(r);
}

async function rescore() {
  if (!current.blob || !current.corners) return;
  showError("");
  $("rescore").disabled = true;
  setStatus("Scoring the radiograph inside the outline...");
  try {
    const r = await post("/api/predict", current.blob, current.corners);
    renderPrediction(r);
    setStatus("Computing heatmaps...");
    $("heatmaps").textContent = "";
    const e = await post("/api/explain?method=gradcam", current.blob, current.corners);
    renderHeatmaps(e);
    setStatus("Done: scored with your outline.");
  } catch (err) {
    setStatus("");
    showError("Could not score with this outline: " + err.message);
  } finally {
    $("rescore").disabled = false;
  }
}

async function analyse(file) {
  if (!file) return;
  showError("");
  show("result", false);
  $("heatmaps").textContent = "";
  const preview = $("preview");
  if (preview.src.startsWith("blob:")) URL.revokeObjectURL(preview.src);
  preview.removeAttribute("src");
  clearOutline();
  current.blob = null;
  setStatus("Preparing the image...");
  try {
    const ready = await prepare(file);
    checkSize(ready.blob);
    if (ready.drawable) preview.src = URL.createObjectURL(ready.blob);
    setStatus("Analysing..." + (ready.note ? " " + ready.note : ""));
    const r = await post("/api/predict" + (ready.drawable ? "" : "?preview=true"), ready.blob);
    if (!ready.drawable) preview.src = "data:image/png;base64," + r.preview_png;
    current.blob = ready.blob;
    renderPrediction(r);
    show("result", true);
    fitPreview();
    setStatus("Computing heatmaps...");
    const e = await post("/api/explain?method=gradcam", ready.blob);
    renderHeatmaps(e);
    setStatus("Done." + (ready.note ? " " + ready.note : ""));
  } catch (err) {
    setStatus("");
    showError("Could not analyse this image: " + err.message);
  }
}

async function loadLimits() {
  try {
    const health = await (await fetch("/api/health")).json();
    maxUploadBytes = health.limits.max_upload_bytes;
  } catch (e) {
    maxUploadBytes = null;  // the server still refuses what is too large, with a 413
  }
}

loadLimits();
$("preview").addEventListener("load", fitPreview);
window.addEventListener("resize", fitPreview);
$("rescore").addEventListener("click", rescore);
for (const id of ["camera", "file"]) {
  $(id).addEventListener("change", (event) => {
    analyse(event.target.files[0]);
    event.target.value = "";
  });
}
