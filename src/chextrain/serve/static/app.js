// chextrain page: upload an image, show the findings, then the saliency maps. No external resources.
//
// A photo is shrunk on the device before upload: decoded with its EXIF orientation applied
// (createImageBitmap, imageOrientation "from-image"), drawn on a canvas at most MAX_SIDE px on its
// long side and sent as JPEG. What the browser cannot decode (DICOM, HEIC) goes as it is, and the
// server renders its preview. The upload size is checked against the server's limit first.
"use strict";

const MAX_SIDE = 2048;  // px on the long side sent to the server
const $ = (id) => document.getElementById(id);
let maxUploadBytes = null;  // from /api/health

function show(id, on) { $(id).hidden = !on; }

function setStatus(text) { $("status").textContent = text; }

function showError(text) {
  $("error").textContent = text;
  show("error", Boolean(text));
}

function mb(bytes) { return (bytes / (1024 * 1024)).toFixed(1) + " MB"; }

async function post(path, file) {
  const form = new FormData();
  form.append("file", file, file.name || "image");
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

async function analyse(file) {
  if (!file) return;
  showError("");
  show("result", false);
  $("heatmaps").textContent = "";
  const preview = $("preview");
  if (preview.src.startsWith("blob:")) URL.revokeObjectURL(preview.src);
  preview.removeAttribute("src");
  setStatus("Preparing the image...");
  try {
    const ready = await prepare(file);
    checkSize(ready.blob);
    if (ready.drawable) preview.src = URL.createObjectURL(ready.blob);
    setStatus("Analysing..." + (ready.note ? " " + ready.note : ""));
    const r = await post("/api/predict" + (ready.drawable ? "" : "?preview=true"), ready.blob);
    if (!ready.drawable) preview.src = "data:image/png;base64," + r.preview_png;
    renderRoute(r);
    renderWarnings(r);
    renderQuality(r);
    renderBars(r);
    show("result", true);
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
for (const id of ["camera", "file"]) {
  $(id).addEventListener("change", (event) => {
    analyse(event.target.files[0]);
    event.target.value = "";
  });
}
