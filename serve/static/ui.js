// The token-reward page: POST v1/token-rewards and draw every response token coloured by its reward.
// Same-origin, no dependencies. The API key lives only in the password field (this page's memory):
// never in localStorage, cookies or the URL. Text from the API is set with textContent, never as HTML.
"use strict";

(() => {
  const $ = (sel, root = document) => root.querySelector(sel);
  const api = (path) => new URL(path, document.baseURI).toString();

  const MODE_HINTS = {
    continuous: "r = 2p − 1: the TLCR continuous reward.",
    fixed: "+1 when p ≥ the server's upper threshold, −1 when p ≤ its lower one (default 0.6 / 0.4), else 0.",
    no_negative: "max(2p − 1, 0): the ablation without negative rewards.",
    no_positive: "min(2p − 1, 0): the ablation without positive rewards.",
  };
  const EXAMPLE = {
    prompt: "\n\nHuman: How do I bake bread?\n\nAssistant:",
    response: " Mix flour, water, salt and yeast, knead for ten minutes, let it rise, then bake it at 220 °C.",
  };

  const [form, itemsBox, template, modeSelect, keyInput, scoreButton, addButton, statusLine, errorBox, results,
    resultList, marks] = ["#score-form", "#items", "#item-template", "#mode", "#api-key", "#score", "#add-item",
    "#status", "#error", "#results", "#result-list", "#show-marks"].map((selector) => $(selector));
  let maxItems = 64;

  // ------------------------------------------------------------------ the form

  function addItem(values) {
    if (itemsBox.children.length >= maxItems) {
      statusLine.textContent = `The server takes at most ${maxItems} items per request.`;
      return null;
    }
    const node = template.content.firstElementChild.cloneNode(true);
    $(".prompt", node).value = values ? values.prompt : "";
    $(".response", node).value = values ? values.response : "";
    $(".remove", node).addEventListener("click", () => { node.remove(); renumber(); });
    itemsBox.appendChild(node);
    renumber();
    return node;
  }

  function renumber() {
    const nodes = [...itemsBox.children];
    nodes.forEach((node, i) => {
      $(".item-title", node).textContent = `Item ${i + 1}`;
      $(".remove", node).hidden = nodes.length === 1;
      $(".remove", node).setAttribute("aria-label", `Remove item ${i + 1}`);
      $(".prompt", node).id = `prompt-${i}`;
      $(".response", node).id = `response-${i}`;
    });
    addButton.disabled = nodes.length >= maxItems;
  }

  function collectItems() {
    return [...itemsBox.children].map((node) => ({ prompt: $(".prompt", node).value, response: $(".response", node).value }));
  }

  function authHeaders() {
    const key = keyInput.value.trim();
    return key ? { authorization: `Bearer ${key}` } : {};
  }

  // ------------------------------------------------------------------ errors

  function clearErrors() {
    errorBox.hidden = true;
    errorBox.replaceChildren();
    for (const p of itemsBox.querySelectorAll(".field-error")) { p.hidden = true; p.textContent = ""; }
    for (const t of itemsBox.querySelectorAll("textarea")) t.removeAttribute("aria-invalid");
  }

  function showError(title, message) {
    const strong = document.createElement("strong");
    strong.textContent = title;
    const text = document.createElement("span");
    text.textContent = message;
    errorBox.replaceChildren(strong, text);
    errorBox.hidden = false;
    errorBox.scrollIntoView({ block: "nearest" });
  }

  function detailText(body, raw, status) {
    if (body && typeof body.detail === "string") return body.detail;
    if (body && Array.isArray(body.detail)) {  // FastAPI's own shape, should a route ever use it
      return body.detail.map((e) => `${(e.loc || []).join(".")}: ${e.msg}`).join("; ");
    }
    if (body && body.detail !== undefined) return JSON.stringify(body.detail);
    const snippet = (raw || "").trim().slice(0, 300);
    return snippet || `HTTP ${status} with an empty body`;
  }

  // Point at the textarea a 422 names: loc ["body", "items", i, "response"].
  function markFields(errors) {
    const nodes = [...itemsBox.children];
    for (const err of errors || []) {
      const loc = err.loc || [];
      const at = loc.indexOf("items");
      if (at < 0) continue;
      const node = nodes[Number(loc[at + 1])];
      const field = loc[at + 2];
      if (!node || (field !== "prompt" && field !== "response")) continue;
      $(`.${field}`, node).setAttribute("aria-invalid", "true");
      const p = $(`.field-error[data-for=${field}]`, node);
      p.textContent = err.msg;
      p.hidden = false;
    }
  }

  function explain(status, body, raw) {
    const detail = detailText(body, raw, status);
    if (status === 401) {
      const hint = keyInput.value.trim()
        ? "The API key you entered was not accepted; check it and score again."
        : "This server requires an API key: enter it in “API key” above and score again.";
      return ["Not authorised (401)", `${detail}. ${hint}`];
    }
    if (status === 422) {
      markFields(body && body.errors);
      return ["The request was rejected (422)", detail];
    }
    if (status === 413) return ["Too large (413)", detail];
    if (status === 400) return ["Bad request (400)", detail];
    return [`Server error (${status})`, detail];
  }

  // ------------------------------------------------------------------ scoring

  async function score(event) {
    event.preventDefault();
    clearErrors();
    const items = collectItems();
    const mode = modeSelect.value;
    scoreButton.disabled = true;
    statusLine.textContent = "Scoring…";
    results.hidden = true;
    resultList.replaceChildren();
    const began = performance.now();
    try {
      let reply;
      try {
        reply = await fetch(api("v1/token-rewards"), {
          method: "POST", cache: "no-store", credentials: "omit", referrerPolicy: "no-referrer",
          headers: { "content-type": "application/json", ...authHeaders() },
          body: JSON.stringify({ items, mode }),
        });
      } catch (err) {
        showError("Could not reach the API", `${err.message || err}. Is the server still running?`);
        statusLine.textContent = "";
        return;
      }
      const raw = await reply.text();
      let body = null;
      try { body = JSON.parse(raw); } catch (_) { body = null; }
      if (!reply.ok) {
        const [title, message] = explain(reply.status, body, raw);
        showError(title, message);
        statusLine.textContent = "";
        return;
      }
      if (!body || !Array.isArray(body.items)) {
        showError("Unexpected answer", `HTTP ${reply.status}: ${raw.slice(0, 300)}`);
        statusLine.textContent = "";
        return;
      }
      const seconds = (performance.now() - began) / 1000;
      render(body, items, seconds);
      statusLine.textContent = `Scored ${body.items.length} item${body.items.length === 1 ? "" : "s"} in ${seconds.toFixed(2)} s.`;
    } finally {
      scoreButton.disabled = false;
    }
  }

  // ------------------------------------------------------------------ results

  const fmt = (x, digits = 4) => (x > 0 ? "+" : x < 0 ? "−" : "") + Math.abs(x).toFixed(digits);
  const signOf = (r) => (r > 0 ? "+" : r < 0 ? "-" : "0");
  const CLASS = { "+": "pos", "-": "neg", "0": "zero" };
  const ARROW = { "+": "▲", "-": "▼", "0": "·" };
  const visible = (s) => s.replace(/\n/g, "↵\n").replace(/\t/g, "⇥\t");
  const quoted = (s) => JSON.stringify(s);

  function render(body, items, seconds) {
    $("#run-info").textContent = `mode ${body.mode} · model ${body.model}`;
    body.items.forEach((item, i) => resultList.appendChild(renderItem(item, i, items[i] || { prompt: "", response: "" })));
    results.hidden = false;
    const first = resultList.querySelector(".result");
    if (first) first.scrollIntoView({ block: "nearest" });
  }

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function renderItem(item, index, input) {
    const box = el("article", "result");
    box.dataset.item = String(index);
    box.dataset.sum = String(item.sum);
    box.dataset.mean = String(item.mean);
    box.dataset.count = String(item.tokens.length);
    box.appendChild(el("h3", "", `Item ${index + 1}`));

    const up = item.tokens.filter((t) => t.reward > 0).length;
    const down = item.tokens.filter((t) => t.reward < 0).length;
    const stats = el("p", "stats");
    const stat = (label, value, cls) => {
      const span = el("span", cls);
      span.append(`${label} `, el("b", "", value));
      stats.appendChild(span);
      return span;
    };
    stat("sum", fmt(item.sum), item.sum > 0 ? "up sum" : item.sum < 0 ? "down sum" : "sum");
    stat("mean", fmt(item.mean), item.mean > 0 ? "up mean" : item.mean < 0 ? "down mean" : "mean");
    stat("tokens", String(item.tokens.length), "count");
    stat("▲", String(up), "up");
    stat("▼", String(down), "down");
    box.appendChild(stats);

    if (input.prompt) {
      const details = el("details");
      details.appendChild(el("summary", "", "prompt"));
      details.appendChild(el("pre", "", input.prompt));
      box.appendChild(details);
    }

    const seq = el("div", "seq");
    seq.classList.toggle("marks", marks.checked);
    seq.setAttribute("role", "group");
    seq.setAttribute("aria-label", `Tokens of item ${index + 1}`);
    const inspector = el("div", "inspector", item.tokens.length
      ? "Hover, tap or focus a token to see its p and reward."
      : "This response has no tokens (the tokenizer dropped every character); it scores 0.");
    inspector.setAttribute("aria-live", "polite");

    // The API's offsets count code points (Python str indices); JS strings index UTF-16 units, so an
    // emoji would shift every later token by one. Slice an array of code points instead.
    const chars = Array.from(input.response);
    const slice = (a, b) => chars.slice(a, b).join("");
    let shown = 0;  // code points of the response drawn so far
    item.tokens.forEach((t, k) => {
      if (t.start > shown) seq.appendChild(el("span", "gap", visible(slice(shown, t.start))));
      const from = Math.max(t.start, shown);
      const text = from < t.end ? slice(from, t.end) : "";
      const sign = signOf(t.reward);
      // The end-of-sequence token every finished response is scored with has no characters: name it.
      const end = !text && t.start >= chars.length;
      const span = el("span", `tok ${CLASS[sign]}` + (end ? " eos" : text ? "" : " piece"), end ? "⟨end⟩" : visible(text));
      span.style.setProperty("--a", (Math.min(1, Math.abs(t.reward)) * 0.85).toFixed(3));
      Object.assign(span.dataset, {
        index: String(k), id: String(t.id), p: String(t.p), reward: String(t.reward),
        start: String(t.start), end: String(t.end), text: t.text, sign,
      });
      span.tabIndex = k === 0 ? 0 : -1;
      span.title = `${quoted(t.text)}  p=${t.p.toFixed(4)}  reward=${fmt(t.reward)} ${ARROW[sign]}`;
      span.setAttribute("aria-label", `token ${k + 1}: ${quoted(t.text)}, reward ${fmt(t.reward, 3)}`);
      seq.appendChild(span);
      shown = Math.max(shown, t.end);
    });
    if (shown < chars.length && item.tokens.length) seq.appendChild(el("span", "gap", visible(slice(shown))));

    const show = (span) => {
      for (const s of seq.querySelectorAll(".tok.selected")) s.classList.remove("selected");
      span.classList.add("selected");
      const d = span.dataset;
      const r = Number(d.reward);
      const line1 = el("div");
      line1.append(`#${Number(d.index) + 1} · token id ${d.id} · characters ${d.start}–${d.end} · text `, el("code", "", quoted(d.text)));
      const line2 = el("div");
      line2.append(`p = ${Number(d.p).toFixed(4)} · reward = `,
        el("span", r > 0 ? "up" : r < 0 ? "down" : "", `${fmt(r)} ${ARROW[d.sign]}`));
      inspector.replaceChildren(line1, line2);
    };
    const tokenOf = (event) => event.target.closest && event.target.closest(".tok");
    seq.addEventListener("mouseover", (e) => { const s = tokenOf(e); if (s) show(s); });
    seq.addEventListener("focusin", (e) => { const s = tokenOf(e); if (s) show(s); });
    seq.addEventListener("click", (e) => { const s = tokenOf(e); if (s) { s.focus(); show(s); } });
    seq.addEventListener("keydown", (e) => {
      const s = tokenOf(e);
      if (!s) return;
      const all = [...seq.querySelectorAll(".tok")];
      const at = all.indexOf(s);
      const to = { ArrowRight: at + 1, ArrowDown: at + 1, ArrowLeft: at - 1, ArrowUp: at - 1, Home: 0, End: all.length - 1 }[e.key];
      if (to === undefined || !all[to]) return;
      e.preventDefault();
      s.tabIndex = -1;
      all[to].tabIndex = 0;
      all[to].focus();
    });

    box.append(seq, inspector);
    return box;
  }

  // ------------------------------------------------------------------ model info

  async function loadInfo() {
    const info = $("#model-info");
    try {
      const reply = await fetch(api("v1/model"), { cache: "no-store", credentials: "omit", headers: authHeaders() });
      if (reply.status === 401) {
        info.textContent = "This server requires an API key for scoring.";
        return;
      }
      if (!reply.ok) { info.textContent = ""; return; }
      const m = await reply.json();
      maxItems = m.max_items || maxItems;
      const name = String(m.checkpoint || "").split("/").filter(Boolean).slice(-2).join("/");
      info.textContent = `Model ${name} · auth ${m.auth ? "on" : "off"} · up to ${m.max_items} items, `
        + `${m.max_tokens} tokens each`;
      renumber();
    } catch (_) {
      info.textContent = "";
    }
  }

  // ------------------------------------------------------------------ wiring

  modeSelect.addEventListener("change", () => { $("#mode-hint").textContent = MODE_HINTS[modeSelect.value] || ""; });
  addButton.addEventListener("click", () => { const node = addItem(); if (node) $(".prompt", node).focus(); });
  marks.addEventListener("change", () => {
    for (const seq of resultList.querySelectorAll(".seq")) seq.classList.toggle("marks", marks.checked);
  });
  keyInput.addEventListener("change", loadInfo);
  form.addEventListener("submit", score);
  $("#mode-hint").textContent = MODE_HINTS[modeSelect.value];
  addItem(EXAMPLE);
  loadInfo();
  document.documentElement.dataset.ready = "1";
})();
