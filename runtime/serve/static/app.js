// huse page: plain JavaScript, no build step, no CDN (the device may be offline).
// Talks to the server's JSON API: /v1/classify, /v1/search, and the page's /ui/ routes.
"use strict";

const $ = (id) => document.getElementById(id);
let config = {index: false, visual: false, photos: false, held_photos: false, review: false, labels: []};

// ---------------------------------------------------------------- helpers
async function api(path, options) {
  const r = await fetch(path, options);
  let body = {};
  try { body = await r.json(); } catch (e) { /* not JSON: the status says it */ }
  if (!r.ok) throw Object.assign(new Error(body.error || `${path}: HTTP ${r.status}`), {status: r.status});
  return body;
}

function postJSON(path, obj) {
  return api(path, {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(obj)});
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

const leaf = (label) => label.split("<").pop();
const pct = (score) => `${Math.max(0, Math.min(100, 100 * score)).toFixed(1)}%`;
// two decimals, but never "1.00" for a score short of 1: that is what needs_review is about
const fmt = (score) => (score == null ? "" : score < 1 && score >= 0.995 ? "0.99+" : score.toFixed(2));

function bar(score) {
  const span = el("span");
  span.style.width = pct(score);
  return el("span", {class: "bar", "aria-hidden": "true"}, span);
}

function setStatus(id, text, isError) {
  const node = $(id);
  node.textContent = text;
  node.classList.toggle("error", !!isError);
}

function blobToBase64(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result).split(",", 2)[1] || "");
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(blob);
  });
}

// ---------------------------------------------------------------- views
function showView() {
  const review = location.hash === "#review" && config.review;
  document.documentElement.classList.toggle("at-review", review);
  $("view-search").hidden = review;
  $("view-review").hidden = !review;
  $("tab-search").removeAttribute("aria-current");
  $("tab-review").removeAttribute("aria-current");
  $(review ? "tab-review" : "tab-search").setAttribute("aria-current", "page");
  if (review) Review.start();
}

// ---------------------------------------------------------------- search and classify
const Query = {photo: null, previewUrl: null};

function setPhoto(blob) {
  Query.photo = blob;
  if (Query.previewUrl) URL.revokeObjectURL(Query.previewUrl);
  Query.previewUrl = blob ? URL.createObjectURL(blob) : null;
  $("query-preview").hidden = !blob;
  $("clear-photo").hidden = !blob;
  if (blob) $("query-preview").src = Query.previewUrl;
  else { $("query-preview").removeAttribute("src"); $("photo").value = ""; }
}

async function runQuery() {
  const title = $("title").value.trim();
  if (!Query.photo && !title) {
    setStatus("search-status", "Choose or drop a photo, type a title, or both.", true);
    return;
  }
  setStatus("search-status", "Working…");
  const image = Query.photo ? await blobToBase64(Query.photo) : null;
  const item = {};
  if (image) item.image = image;
  if (title) item.title = title;
  try {
    const res = await postJSON("/v1/classify", {items: [item], top_k: 5, mode: "auto"});
    renderPrediction(res.results[0]);
    if (config.index) await runSearch(image, title);
    setStatus("search-status", "");
  } catch (e) {
    setStatus("search-status", e.message, true);
  }
}

function renderPrediction(r) {
  $("prediction").hidden = false;
  $("pred-mode").textContent = r.mode ? `(${r.mode})` : "";
  $("needs-review").hidden = !r.needs_review;
  const problem = r.error || r.warning || "";
  $("pred-problem").hidden = !problem;
  $("pred-problem").textContent = problem;
  const path = $("class-path"), topk = $("topk"), labels = $("labels");
  path.replaceChildren();
  topk.replaceChildren();
  labels.replaceChildren();
  // A multi-label bundle's answer is a set: every class at or above its own threshold (none: the best alone).
  $("h-labels").hidden = labels.hidden = !r.labels;
  const alone = (r.labels || []).some((x) => x.score < x.threshold);
  $("labels-note").textContent = alone ? "(no class reached its threshold: the best one alone)"
                                       : "(each class at or above its threshold)";
  // One row of a list: the class's name, a bar and the score.
  const row = (x, name) => el("li", {"data-label": x.label, "data-score": String(x.score)},
    name, bar(x.score), el("span", {class: "score", text: fmt(x.score)}));
  for (const x of r.labels || []) {
    labels.append(row(x, el("span", {class: "name", title: `${x.label} (threshold ${fmt(x.threshold)})`, text: x.label})));
  }
  for (const p of r.path || []) {
    path.append(row(p, el("span", {class: "name", title: p.label},
      el("span", {class: "level", text: `level ${p.level}`}), " ", leaf(p.label))));
  }
  for (const t of r.top_k || []) topk.append(row(t, el("span", {class: "name", title: t.label, text: t.label})));
}

async function runSearch(image, title) {
  const space = $("space").value;
  if (space === "visual" && !image) {
    throw new Error("The visual space searches from a photo: add one, or use universal.");
  }
  const request = {k: Number($("k").value) || 12, target: $("target").value, space: space};
  if (image) request.image = image;
  if (title && space !== "visual") request.title = title;  // the visual space takes photos only
  const filter = $("filter").value.trim();
  if (filter) request.filter = filter;
  const res = await postJSON("/v1/search", request);
  renderHits(res.results[0].hits || res.results[0]);
}

// A hit's photo: its file under --images, or the photo the index keeps (a Parquet catalog's bytes: no path).
const hasPhoto = (h) => (config.photos && h.image) || (config.held_photos && !h.image);

function renderHits(hits) {
  $("results").hidden = false;
  const list = $("hits");
  list.replaceChildren();
  if (!hits.length) list.append(el("li", {class: "note", text: "No product matches (is the class filter right?)."}));
  for (const h of hits) {
    const noPhoto = () => el("span", {class: "nophoto", text: "no photo"});
    const photo = hasPhoto(h)
      ? el("img", {src: `/ui/item/${h.item}/image?size=192`, alt: h.name || "product photo", loading: "lazy"})
      : noPhoto();
    photo.addEventListener("error", () => photo.replaceWith(noPhoto()));  // a kept-photos index: some have none
    const button = el("button", {type: "button", "data-item": String(h.item), "data-classes": h.classes || "",
                                 "data-score": String(h.score),
                                 "aria-label": `Search from ${h.name || "this product"}`},
      photo, el("div", {class: "hit-name", title: h.name || "", text: h.name || "(no title)"}),
      el("div", {class: "hit-class", title: h.classes || "", text: h.classes ? leaf(h.classes) : "—"}),
      el("div", {class: "hit-score", text: `score ${fmt(h.score)} · ${h.modality}`}));
    button.addEventListener("click", () => searchFrom(h));
    list.append(el("li", {class: "hit"}, button));
  }
}

// Clicking a result searches from it: its stored photo (and its title in the universal space).
async function searchFrom(hit) {
  try {
    const r = hasPhoto(hit) ? await fetch(`/ui/item/${hit.item}/photo`) : null;
    if (r && r.ok) {
      setPhoto(await r.blob());
    } else if (r && !(r.status === 404 && !hit.image)) {  // a kept-photos index's item may have none
      throw new Error((await r.json()).error);
    } else {
      setPhoto(null);
    }
    $("title").value = hit.name || "";
    await runQuery();
    window.scrollTo(0, 0);
  } catch (e) {
    setStatus("search-status", e.message, true);
  }
}

function initSearch() {
  $("photo").addEventListener("change", () => setPhoto($("photo").files[0] || null));
  $("clear-photo").addEventListener("click", () => setPhoto(null));
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    const file = [...e.dataTransfer.files].find((f) => f.type.startsWith("image/"));
    if (file) setPhoto(file);
  });
  $("query-form").addEventListener("submit", (e) => { e.preventDefault(); runQuery(); });
  const prefixes = new Set();
  for (const label of config.labels) {
    const parts = label.split("<");
    for (let i = 1; i <= parts.length; i++) prefixes.add(parts.slice(0, i).join("<"));
  }
  $("prefixes").replaceChildren(...[...prefixes].sort().map((p) => el("option", {value: p})));
  $("search-options").disabled = !config.index;
  $("go").textContent = config.index ? "Classify and search" : "Classify";
  if (!config.index) $("server-note").textContent = "no index: start the server with --index to search";
  $("space").querySelector("option[value=visual]").disabled = !config.visual;
}

// ---------------------------------------------------------------- review queue
const Review = {
  started: false, statePromise: null, buffer: [], lastPos: -1, exhausted: false, fetching: null, current: null,
  busy: false,
  labels: [], matches: [], active: -1, timings: {firstItem: null, nextItem: []},

  // Opened at #review: the queue is asked for at once, beside /ui/config, not after it.
  preload() {
    if (this.statePromise) return;
    this.statePromise = api("/ui/review/state");
    this.statePromise.catch(() => {});  // a server without --review: start() is never called
    const first = this.fill(30);
    if (first) first.catch(() => {});
  },

  async start() {
    if (this.started) { this.focusCard(); return; }
    this.started = true;
    $("reviewer").value = localStorage.getItem("huse-reviewer") || "";
    try {
      this.preload();
      const [state] = await Promise.all([this.statePromise, this.fetching]);
      this.labels = state.labels;
      this.showProgress(state.progress);
      await this.next();
      performance.mark("huse:first-item");
      this.timings.firstItem = performance.now();
    } catch (e) {
      setStatus("review-status", e.message, true);
    }
  },

  fill(limit) {
    if (this.fetching || this.exhausted) return this.fetching;
    // the server sends undecided rows after this position: the last one held, or the one shown
    const after = this.buffer.length ? this.buffer[this.buffer.length - 1].pos : this.lastPos;
    this.fetching = api(`/ui/review/items?after=${after}&limit=${limit}`).then((res) => {
      if (!res.items.length) this.exhausted = true;
      this.buffer.push(...res.items);
      if (this.current) this.prefetch();
    }).finally(() => { this.fetching = null; });
    return this.fetching;
  },

  photoUrl: (item) => `/ui/review/image/${item.row}?size=384`,

  prefetch() {  // the next photos load while the reviewer looks at this one
    for (const item of this.buffer.slice(0, 4)) if (item.has_image) new Image().src = this.photoUrl(item);
  },

  async next() {
    if (!this.buffer.length && !this.exhausted) await this.fill(30);
    const item = this.buffer.shift() || null;
    this.current = item;
    if (item) this.lastPos = item.pos;
    if (this.buffer.length < 10 && !this.exhausted) this.fill(30);
    await this.render(item);
    this.prefetch();  // after this row's photo: the next ones never delay it
  },

  async render(item) {
    $("card").hidden = !item;
    $("review-empty").hidden = !!item;
    if (!item) return;
    $("review-title").textContent = item.name || "(no title)";
    const meta = [`row ${item.row}`, `queue position ${item.pos + 1}`];
    if (item.product_id) meta.push(`product ${item.product_id}`);
    if (item.classes) meta.push(`catalog class ${item.classes}`);
    meta.push(`model: ${item.mode || "?"}`);
    $("review-meta").textContent = meta.join(" · ");
    // A multi-label row is decided as a set: the keys and clicks put classes in or out, Enter saves it.
    this.chosen = item.labels ? new Set(item.labels) : null;
    $("accept").firstChild.textContent = this.chosen ? "Save these classes " : "Accept top class ";
    $("correct-label").firstChild.textContent = this.chosen ? "Add a class " : "Correct class ";
    this.drawChoices();
    this.closeList();
    $("correct").value = "";
    const img = $("review-photo"), nophoto = $("review-nophoto");
    img.hidden = !item.has_image;
    nophoto.hidden = item.has_image;
    nophoto.textContent = item.problem || "no photo";
    if (item.has_image) {
      img.alt = `Photo of ${item.name || "row " + item.row}`;
      img.src = this.photoUrl(item);
      try { await img.decode(); } catch (e) { /* a broken photo still shows its title and choices */ }
    }
    if (!this.typing()) this.focusCard();
    await new Promise((resolve) => requestAnimationFrame(() => resolve()));
  },

  drawChoices() {
    const item = this.current, choices = $("choices");
    choices.replaceChildren();
    item.top_k.forEach((t, i) => {
      const inSet = this.chosen ? {"aria-pressed": String(this.chosen.has(t.label))} : {};
      const verb = this.chosen ? (this.chosen.has(t.label) ? "Take out" : "Put in") : "Pick";
      const score = t.score === null ? "—" : fmt(t.score);  // null: a class added by name, not among the scores
      const b = el("button", {type: "button", "data-label": t.label, ...inSet,
                              "aria-label": `${verb} ${t.label}, score ${score} (key ${i + 1})`},
        el("span", {class: "key", text: String(i + 1)}), el("span", {class: "name", title: t.label, text: t.label}),
        bar(t.score || 0), el("span", {class: "score", text: score}));
      b.addEventListener("click", () => this.pick(i));
      choices.append(el("li", {}, b));
    });
  },

  toggle(label) {  // a multi-label row: put a class in its set, or take it out
    const item = this.current;
    if (this.chosen.has(label)) this.chosen.delete(label);
    else this.chosen.add(label);
    if (!item.top_k.some((t) => t.label === label)) item.top_k.push({label: label, score: null});  // typed
    this.drawChoices();
  },

  accept() {  // Enter: the top-1, or a multi-label row's set as it stands (the server records the predicted set as accept)
    if (!this.chosen) return this.decide("accept");
    if (!this.chosen.size) return setStatus("review-status", "Put at least one class in the set, or skip the row.", true);
    return this.decide("correct", [...this.chosen].join("|"));
  },

  focusCard() { if (!$("card").hidden) $("card").focus({preventScroll: true}); },
  typing: () => document.activeElement === $("correct") || document.activeElement === $("reviewer"),

  showProgress(p) {
    $("review-progress").max = Math.max(1, p.total);
    $("review-progress").value = p.done;
    $("progress-text").textContent = `${p.done.toLocaleString()} done · ${p.left.toLocaleString()} left ` +
      `(accepted ${p.accept}, corrected ${p.correct}, skipped ${p.skip})`;
  },

  pick(i) {
    const item = this.current;
    if (!item || i >= item.top_k.length) return;
    if (this.chosen) return this.toggle(item.top_k[i].label);
    return i === 0 ? this.decide("accept") : this.decide("correct", item.top_k[i].label);
  },

  async decide(action, label) {
    const item = this.current;
    if (!item || this.busy) return;
    this.busy = true;
    performance.mark("huse:decide");
    const started = performance.now();
    setStatus("review-status", `Saving row ${item.row}…`);
    try {
      const body = {row: item.row, action: action, reviewer: $("reviewer").value.trim() || null};
      if (label) body.label = label;
      const res = await postJSON("/ui/review/decide", body);
      const e = res.entry;
      const what = e.action === "skip" ? "skipped" : `${e.action === "accept" ? "accepted" : "corrected to"} ${e.label}`;
      const prev = res.previous;  // an earlier decision on this row (another reviewer's?): kept in the journal
      const by = prev && prev.reviewer ? ` by ${prev.reviewer}` : "";
      const earlier = prev ? ` (replaces an earlier decision: ${prev.action}${by})` : "";
      setStatus("review-status", `Saved row ${e.row}: ${what}${earlier}`);
      $("recent").prepend(el("li", {class: "saved", "data-row": String(e.row)},
                             `row ${e.row} ${item.name || ""}: ${what} ✓ saved`));
      while ($("recent").children.length > 8) $("recent").lastChild.remove();
      await this.next();
      this.focusCard();  // also after a correction typed in the typeahead: the keys act on the next row
      performance.measure("huse:next-item", "huse:decide");
      this.timings.nextItem.push(performance.now() - started);
      this.busy = false;
      this.showProgress(res.progress);  // last: once the count moves, the next row takes keys
    } catch (err) {
      setStatus("review-status", `Not saved: ${err.message}`, true);
    } finally {
      this.busy = false;
    }
  },

  // typeahead over the hierarchy: every word typed must occur in the class path
  search(text) {
    const words = text.toLowerCase().split(/\s+/).filter(Boolean);
    const fits = (label) => words.every((w) => label.toLowerCase().includes(w));
    this.matches = words.length ? this.labels.filter(fits).slice(0, 12) : [];
    this.active = this.matches.length ? 0 : -1;
    this.drawList();
  },

  drawList() {
    const list = $("correct-list");
    list.replaceChildren(...this.matches.map((label, i) => {
      const li = el("li", {role: "option", id: `option-${i}`, "aria-selected": String(i === this.active), text: label});
      li.addEventListener("mousedown", (e) => { e.preventDefault(); this.choose(label); });
      return li;
    }));
    list.hidden = !this.matches.length;
    $("correct").setAttribute("aria-expanded", String(!!this.matches.length));
    if (this.active >= 0) $("correct").setAttribute("aria-activedescendant", `option-${this.active}`);
    else $("correct").removeAttribute("aria-activedescendant");
  },

  choose(label) {  // the typeahead is done: keys go to the review again at once
    $("correct").value = "";
    this.closeList();
    this.focusCard();
    if (this.chosen) this.toggle(label);  // a multi-label row: into the set, saved with Enter
    else this.decide("correct", label);
  },

  closeList() { this.matches = []; this.active = -1; this.drawList(); },

  onComboKey(e) {
    if (e.key === "ArrowDown" || e.key === "ArrowUp") {
      e.preventDefault();
      if (!this.matches.length) return;
      const step = e.key === "ArrowDown" ? 1 : -1;
      this.active = (this.active + step + this.matches.length) % this.matches.length;
      this.drawList();
    } else if (e.key === "Enter") {
      e.preventDefault();
      if (this.active >= 0) this.choose(this.matches[this.active]);
    } else if (e.key === "Escape") {
      e.preventDefault();
      $("correct").value = "";
      this.closeList();
      this.focusCard();
    }
  },

  onKey(e) {
    if ($("view-review").hidden || e.ctrlKey || e.metaKey || e.altKey) return;
    const t = e.target;
    if (t === $("correct")) return this.onComboKey(e);
    if (t === $("reviewer")) {
      if (e.key === "Enter" || e.key === "Escape") { e.preventDefault(); this.focusCard(); }
      return;
    }
    if (["INPUT", "SELECT", "TEXTAREA"].includes(t.tagName)) return;
    if (["BUTTON", "A"].includes(t.tagName) && (e.key === "Enter" || e.key === " ")) return;  // it acts itself
    if (e.key === "Enter") { e.preventDefault(); this.accept(); }
    else if (/^[1-9]$/.test(e.key)) { e.preventDefault(); this.pick(Number(e.key) - 1); }
    else if (e.key === "s" || e.key === "S") { e.preventDefault(); this.decide("skip"); }
    else if (e.key === "/") { e.preventDefault(); $("correct").focus(); }
  },

  init() {
    $("accept").addEventListener("click", () => this.accept());
    $("skip").addEventListener("click", () => this.decide("skip"));
    $("correct").addEventListener("input", () => this.search($("correct").value));
    $("reviewer").addEventListener("change", () => localStorage.setItem("huse-reviewer", $("reviewer").value.trim()));
    document.addEventListener("keydown", (e) => this.onKey(e));
  },
};
window.huseReview = Review;  // the browser tests read Review.timings

// ---------------------------------------------------------------- start
// A server with --token-file answers 401 until the page signs in; the session cookie then goes with every request.
function signIn() {
  document.documentElement.classList.remove("at-review");
  $("view-search").hidden = true;
  $("view-signin").hidden = false;
  $("token").focus();
  $("signin-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    setStatus("signin-status", "Signing in...");
    try {
      await postJSON("/ui/signin", {token: $("token").value});
      location.reload();
    } catch (err) {
      setStatus("signin-status", err.message, true);
    }
  });
}

async function main() {
  if (location.hash === "#review") Review.preload();
  try {
    config = await api("/ui/config");
  } catch (e) {
    if (e.status === 401) return signIn();
    setStatus("search-status", `The server did not answer /ui/config: ${e.message}`, true);
    return;
  }
  $("tab-review").hidden = !config.review;
  initSearch();
  Review.init();
  window.addEventListener("hashchange", showView);
  showView();
}

main();
