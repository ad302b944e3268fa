// stackcat's page: try a product, review a queue. Plain DOM, no library, nothing from the network.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { health: null, categories: [], queue: [], position: 0, source: "", pickerIndex: 0 };

function element(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (name === "class") node.className = value; else node.setAttribute(name, value);
  }
  for (const child of children) node.append(child instanceof Node ? child : String(child ?? ""));
  return node;
}

function headers(extra = {}) {
  const token = $("token").value || localStorage.getItem("stackcat-token") || "";
  return token ? { ...extra, Authorization: "Bearer " + token } : extra;
}

async function call(path, options = {}) {
  const answer = await fetch(path, options);
  const body = (answer.headers.get("content-type") || "").includes("json") ? await answer.json() : await answer.text();
  if (!answer.ok) {
    const field = body && body.field ? body.field + ": " : "";
    throw new Error(field + (body && body.error ? body.error : answer.status));
  }
  return body;
}

const percent = (p) => (p == null ? "" : (100 * p).toFixed(1) + "%");

// ------------------------------------------------------------------ start

async function start() {
  $("token").value = localStorage.getItem("stackcat-token") || "";
  $("token").addEventListener("change", () => localStorage.setItem("stackcat-token", $("token").value));
  for (const tab of document.querySelectorAll(".tab")) tab.addEventListener("click", () => show(tab.dataset.panel));
  state.health = await call("/health");
  $("model").textContent = `model ${state.health.model_version} · ${state.health.categories} categories`;
  state.categories = (await call("/v1/categories")).categories;
  buildFields(state.health.fields);
  $("product-form").addEventListener("submit", (event) => { event.preventDefault(); categorize(); });
  $("product-form").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && event.ctrlKey) { event.preventDefault(); categorize(); }
  });
  $("queue-file").addEventListener("change", openQueueFile);
  $("pending").addEventListener("click", openPending);
  $("accept").addEventListener("click", () => decide(currentItem() && currentItem().proposed));
  $("skip").addEventListener("click", () => move(1));
  $("back").addEventListener("click", () => move(-1));
  $("picker").addEventListener("input", () => { state.pickerIndex = 0; renderPicker(); });
  $("picker").addEventListener("keydown", pickerKeys);
  document.addEventListener("keydown", reviewKeys);
}

function show(panel) {
  for (const tab of document.querySelectorAll(".tab")) tab.classList.toggle("active", tab.dataset.panel === panel);
  $("try").classList.toggle("hidden", panel !== "try");
  $("review").classList.toggle("hidden", panel !== "review");
}

// ------------------------------------------------------------------ try a product

function buildFields(fields) {
  const box = $("fields");
  for (const name of [fields.id, ...fields.text, ...fields.attributes].filter(Boolean)) {
    box.append(element("label", {}, name, element("input", { name, "data-field": name, id: "field-" + name })));
  }
}

async function productRequest() {
  const pasted = $("json").value.trim();
  if (pasted) return { method: "POST", headers: { "content-type": "application/json" }, body: pasted };
  const product = {};
  for (const input of document.querySelectorAll("[data-field]")) if (input.value.trim()) product[input.dataset.field] = input.value;
  const payload = JSON.stringify({ products: [product] });
  const photo = $("photo").files[0];
  if (!photo) return { method: "POST", headers: { "content-type": "application/json" }, body: payload };
  const form = new FormData();
  form.append("products", payload);
  form.append("image_0", photo);
  return { method: "POST", body: form };
}

async function categorize() {
  $("try-error").textContent = "";
  $("results").replaceChildren();
  try {
    const answer = await call("/v1/categorize", await productRequest());
    for (const prediction of answer.predictions) $("results").append(predictionTable(prediction));
  } catch (error) {
    $("try-error").textContent = error.message;
  }
}

function predictionTable(prediction) {
  const rows = prediction.top.map((c, rank) => element("tr", {},
    element("td", {}, rank + 1), element("td", { class: "category" }, c.category), element("td", { class: "muted" }, c.path),
    element("td", {}, percent(c.probability)),
    element("td", { style: "width:30%" }, element("div", { class: "bar", style: `width:${100 * c.probability}%` }))));
  return element("table", { class: "prediction" },
    element("caption", {}, `product ${prediction.id}: ${prediction.review === "auto" ? "auto-accepted" : "for review"}`),
    element("thead", {}, element("tr", {}, ...["#", "category", "tree path", "probability", ""].map((h) => element("th", {}, h)))),
    element("tbody", {}, ...rows));
}

// ------------------------------------------------------------------ review queue

async function openQueueFile() {
  const file = $("queue-file").files[0];
  if (!file) return;
  const form = new FormData();
  form.append("file", file);
  $("queue-file").value = "";  // choosing the same file again reopens it
  await loadQueue(() => call("/v1/queue", { method: "POST", body: form }), file.name);
}

async function openPending() {
  await loadQueue(() => call("/v1/queue/pending"), "service");
}

async function loadQueue(fetchItems, source) {
  $("queue-error").textContent = "";
  try {
    state.queue = (await fetchItems()).items;
    state.source = source;
    state.position = Math.max(0, state.queue.findIndex((item) => !item.decided));
    renderItem();
  } catch (error) {
    $("queue-error").textContent = error.message;
  }
}

const currentItem = () => state.queue[state.position];

function renderItem() {
  const item = currentItem();
  $("queue-empty").classList.toggle("hidden", Boolean(item));
  $("item").classList.toggle("hidden", !item);
  if (!item) { $("queue-empty").textContent = state.queue.length ? "" : "The queue is empty."; return; }
  $("position").textContent = `${state.position + 1} / ${state.queue.length} · id ${item.id}`;
  $("decided").classList.toggle("hidden", !item.decided);
  $("decided").textContent = item.decided ? "decided: " + item.decided : "";
  $("item-photo").classList.toggle("hidden", !item.has_image);
  if (item.has_image) $("item-photo").src = "/v1/images/" + encodeURIComponent(item.id);
  $("item-title").textContent = item.title || `product ${item.id}`;
  $("item-text").textContent = item.text && item.text !== item.title ? item.text : "";
  $("item-given").textContent = item.given_label ? "label in the table: " + item.given_label : "";
  $("candidates").replaceChildren(...item.candidates.slice(0, 5).map((c, index) => {
    const li = element("li", { class: c.category === item.proposed ? "proposed" : "", "data-category": c.category },
      element("kbd", {}, index + 1), " ", element("strong", {}, c.category), " ", percent(c.probability),
      element("span", { class: "path" }, c.path));
    li.addEventListener("click", () => decide(c.category));
    return li;
  }));
  $("picker").value = "";
  $("picker-list").replaceChildren();
}

function move(step) {
  if (!state.queue.length) return;
  state.position = Math.min(state.queue.length - 1, Math.max(0, state.position + step));
  renderItem();
}

async function decide(label) {
  const item = currentItem();
  if (!item || !label) return;
  try {
    const saved = await call("/v1/corrections", {
      method: "POST", headers: headers({ "content-type": "application/json" }),
      body: JSON.stringify({ id: item.id, label, was: item.given_label || item.proposed, source: state.source }),
    });
    item.decided = label;
    $("saved").textContent = `saved #${saved.seq}: ${item.id} → ${label}`;
    $("queue-error").textContent = "";
    if (state.position < state.queue.length - 1) move(1); else renderItem();
  } catch (error) {
    $("queue-error").textContent = error.message;
  }
}

function pickerMatches() {
  const words = $("picker").value.toLowerCase().split(/\s+/).filter(Boolean);
  if (!words.length) return [];
  return state.categories.filter((c) => words.every((w) => (c.path + " " + c.category).toLowerCase().includes(w))).slice(0, 20);
}

function renderPicker() {
  const matches = pickerMatches();
  state.pickerIndex = Math.min(state.pickerIndex, Math.max(0, matches.length - 1));
  $("picker-list").replaceChildren(...matches.map((c, index) => {
    const li = element("li", { class: index === state.pickerIndex ? "active" : "", "data-category": c.category }, c.path);
    li.addEventListener("mousedown", (event) => { event.preventDefault(); decide(c.category); });
    return li;
  }));
}

function pickerKeys(event) {
  const matches = pickerMatches();
  if (event.key === "ArrowDown" || event.key === "ArrowUp") {
    event.preventDefault();
    state.pickerIndex = Math.max(0, Math.min(matches.length - 1, state.pickerIndex + (event.key === "ArrowDown" ? 1 : -1)));
    renderPicker();
  } else if (event.key === "Enter") {
    event.preventDefault();
    if (matches[state.pickerIndex]) decide(matches[state.pickerIndex].category);
  } else if (event.key === "Escape") {
    $("picker").blur();
  }
}

function reviewKeys(event) {
  if ($("review").classList.contains("hidden") || !currentItem()) return;
  if (["INPUT", "TEXTAREA", "SELECT"].includes(document.activeElement.tagName)) return;
  const item = currentItem();
  if (/^[1-5]$/.test(event.key) && item.candidates[Number(event.key) - 1]) decide(item.candidates[Number(event.key) - 1].category);
  else if (event.key === "a" || event.key === "Enter") decide(item.proposed);
  else if (event.key === "s" || event.key === "ArrowRight") move(1);
  else if (event.key === "ArrowLeft") move(-1);
  else if (event.key === "/") { event.preventDefault(); $("picker").focus(); }
  else return;
  event.preventDefault();
}

start().catch((error) => { $("model").textContent = "cannot reach the service: " + error.message; });
