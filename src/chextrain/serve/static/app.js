// chextrain page: upload an image, show the findings, then the Grad-CAM heatmaps. No external resources.
"use strict";

const $ = (id) => document.getElementById(id);

function show(id, on) { $(id).hidden = !on; }

function setStatus(text) { $("status").textContent = text; }

function showError(text) {
  $("error").textContent = text;
  show("error", Boolean(text));
}

async function post(path, file) {
  const form = new FormData();
  form.append("file", file, file.name || "image");
  const response = await fetch(path, { method: "POST", body: form });
  let body;
  try { body = await response.json(); } catch (e) { body = { detail: response.statusText }; }
  if (!response.ok) throw new Error(body.detail || body.error || ("HTTP " + response.status));
  return body;
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

function renderHeatmaps(r) {
  const box = $("heatmaps");
  box.textContent = "";
  for (const [slug, png] of Object.entries(r.heatmaps)) {
    const fig = document.createElement("figure");
    const img = document.createElement("img");
    img.src = "data:image/png;base64," + png;
    img.alt = "Grad-CAM heatmap for " + (r.withheld ? r.withheld_pathologies : r.pathologies)[slug].name;
    img.dataset.slug = slug;
    const cap = document.createElement("figcaption");
    const v = (r.withheld ? r.withheld_pathologies : r.pathologies)[slug];
    cap.textContent = v.name + (r.withheld ? " (not scored)" : " " + pct(v.prob));
    fig.append(img, cap);
    box.appendChild(fig);
  }
}

async function analyse(file) {
  if (!file) return;
  showError("");
  show("result", false);
  $("heatmaps").textContent = "";
  const preview = $("preview");
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.src = URL.createObjectURL(file);
  setStatus("Analysing...");
  try {
    const r = await post("/api/predict", file);
    renderRoute(r);
    renderWarnings(r);
    renderBars(r);
    show("result", true);
    setStatus("Computing heatmaps...");
    const e = await post("/api/explain?method=gradcam", file);
    renderHeatmaps(e);
    setStatus("Done.");
  } catch (err) {
    setStatus("");
    showError("Could not analyse this image: " + err.message);
  }
}

for (const id of ["camera", "file"]) {
  $(id).addEventListener("change", (event) => {
    analyse(event.target.files[0]);
    event.target.value = "";
  });
}
