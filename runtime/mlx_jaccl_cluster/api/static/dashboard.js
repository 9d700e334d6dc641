// mlx-jaccl-cluster dashboard: plain JS, no build step, no CDN.
// Polls /dashboard/state (1 s), /requests and /errors (2 s); the chat box streams
// POST /v1/chat/completions. With an API key, it is kept in sessionStorage and sent
// as a Bearer header on every call.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY = "mjc-api-key";
let model = null;
let keyNeeded = false;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k === "style") node.style.cssText = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : String(c));
  return node;
}

function headers(extra) {
  const h = Object.assign({}, extra);
  const key = sessionStorage.getItem(KEY);
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

async function getJSON(path) {
  const r = await fetch(path, { headers: headers(), cache: "no-store" });
  if (r.status === 401) {
    askForKey(sessionStorage.getItem(KEY) ? "That key was refused; enter the cluster's API key." : null);
    return null;
  }
  if (!r.ok) throw new Error(path + ": HTTP " + r.status);
  return r.json();
}

function askForKey(message) {
  keyNeeded = true;
  $("key-form").hidden = false;
  if (message) $("key-message").textContent = message;
}

$("key-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  sessionStorage.setItem(KEY, $("key-input").value.trim());
  keyNeeded = false;
  $("key-form").hidden = true;
  tick();
  refreshHistory();
});

// --- formatting -------------------------------------------------------------------
function bytes(n) {
  if (n == null) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return n.toFixed(n >= 100 || i === 0 ? 0 : 1) + " " + units[i];
}
function seconds(s) {
  if (s == null) return "–";
  if (s < 1e-3) return (s * 1e6).toFixed(0) + " µs";
  if (s < 1) return (s * 1e3).toFixed(s < 0.01 ? 2 : 1) + " ms";
  return s.toFixed(2) + " s";
}
function rate(bps) {
  if (bps == null) return "–";
  return bps >= 1e9 ? (bps / 1e9).toFixed(2) + " GB/s" : (bps / 1e6).toFixed(1) + " MB/s";
}
function clock(t) { return new Date(t * 1000).toLocaleTimeString(); }
function ago(t, now) { return t == null ? "never" : Math.max(0, Math.round(now - t)) + " s ago"; }

// --- the live state -----------------------------------------------------------------
function renderTopology(s) {
  const box = $("topology");
  const scale = Math.max(1, ...s.ranks.map((r) => Math.max(r.memory.peak || 0, (r.memory.active || 0) + (r.memory.cache || 0))));
  const nodes = [];
  s.ranks.forEach((r, i) => {
    if (i > 0) {
      const link = s.backend.startsWith("jaccl") ? "RDMA" : s.backend;
      nodes.push(el("div", { class: "edge" }, "⇅ " + link + (r.up && s.ranks[0].up ? " link up" : " link down")));
    }
    const m = r.memory || {};
    const pct = (v) => (100 * (v || 0) / scale).toFixed(1) + "%";
    const bar = el("div", { class: "bar", title: "active / cache / peak" },
      el("span", { class: "active", style: "width:" + pct(m.active) }),
      el("span", { class: "cache", style: "left:" + pct(m.active) + ";width:" + pct(m.cache) }),
      el("span", { class: "peak", style: "left:" + pct(m.peak) }));
    const state = r.up ? "up" : "down";
    const beat = r.silent_s == null ? "" : " · beat " + r.silent_s.toFixed(1) + " s ago";
    nodes.push(el("div", { class: "rank " + state, "data-rank": r.rank, "data-state": state },
      el("div", { class: "head" },
        el("b", {}, "rank " + r.rank), el("span", {}, r.rank === 0 ? "leader · API" : "follower"),
        el("span", {}, r.host + (r.address ? " (" + r.address + ")" : "")),
        el("span", { class: "state badge " + (r.up ? "ok" : "bad") }, state)),
      el("div", { class: "links" }, (r.links.length ? r.links.join(", ") : "no backend file") + beat),
      bar,
      el("small", {}, "active " + bytes(m.active) + " · cache " + bytes(m.cache) + " · peak " + bytes(m.peak) +
        " · RSS " + bytes(m.rss))));
  });
  box.replaceChildren(...nodes);
}

function renderSparkline(series) {
  const peak = Math.max(1, ...series);
  const step = 300 / Math.max(1, series.length - 1);
  $("sparkline-line").setAttribute("points",
    series.map((v, i) => (i * step).toFixed(1) + "," + (58 - 56 * v / peak).toFixed(1)).join(" "));
  $("sparkline-caption").textContent = "tokens/s, last " + series.length + " s (peak " + Math.max(0, ...series) + ")";
}

function renderState(s) {
  const badge = $("status");
  badge.textContent = s.status;
  badge.className = "badge " + (s.status === "ready" ? "ok" : ["lost", "failed"].includes(s.status) ? "bad" : "");
  model = s.model;
  $("summary").textContent = s.model + " · " + s.backend + " · " + s.parallel + " · " + s.ranks_up + "/" +
    s.world_size + " ranks up · uptime " + Math.round(s.uptime_s) + " s";
  renderTopology(s);
  const series = s.tokens_per_s;
  $("tok-s").textContent = series.length ? series[series.length - 1] : 0;
  $("queue-depth").textContent = s.queue_depth;
  $("batch-size").textContent = s.batch_size;
  $("inflight").textContent = s.inflight;
  renderSparkline(series);
  const l = s.link;
  $("link-latency").textContent = seconds(l.latency_s);
  $("link-bandwidth").textContent = rate(l.bandwidth_bps);
  $("link-probes").textContent = l.probes;
  $("link-step").textContent = seconds(l.last_step_s);
  $("link-age").textContent = s.world_size < 2 ? "one rank: no link to probe" :
    "latency " + ago(l.latency_at, s.time) + " · bandwidth " + ago(l.bandwidth_at, s.time) +
    (l.bandwidth_bytes ? " (" + bytes(l.bandwidth_bytes) + " messages)" : "") + " · measured only while idle";
}

function fill(table, rows) {
  $(table).tBodies[0].replaceChildren(...rows);
}

async function refreshHistory() {
  if (keyNeeded) return;
  let reqs, errs;
  try {
    [reqs, errs] = await Promise.all([getJSON("/requests"), getJSON("/errors")]);
  } catch (err) {
    return;  // the status badge already says the cluster is unreachable
  }
  if (reqs) fill("requests", reqs.data.map((r) => el("tr", {},
    el("td", {}, clock(r.time)), el("td", {}, r.route), el("td", {}, r.prompt_tokens),
    el("td", {}, r.completion_tokens), el("td", {}, seconds(r.ttft_s)),
    el("td", {}, r.tok_s == null ? "–" : r.tok_s.toFixed(1)), el("td", { title: r.error || "" }, r.status))));
  if (errs) fill("errors", errs.data.map((e) => el("tr", {},
    el("td", {}, clock(e.time)), el("td", {}, e.route), el("td", {}, e.status), el("td", {}, e.type),
    el("td", { class: "message" }, e.message))));
}

async function tick() {
  if (keyNeeded) return;
  try {
    const s = await getJSON("/dashboard/state");
    if (s) renderState(s);
  } catch (err) {
    $("status").textContent = "unreachable";
    $("status").className = "badge bad";
  }
}

// --- chat -------------------------------------------------------------------------------
const conversation = [];

$("chat-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const text = $("chat-input").value.trim();
  if (!text || !model) return;
  $("chat-input").value = "";
  $("chat-send").disabled = true;
  conversation.push({ role: "user", content: text });
  $("chat-log").append(el("div", { class: "msg user" }, text));
  const out = el("div", { class: "msg assistant", "data-state": "streaming", "data-chunks": "0" });
  $("chat-log").append(out);
  let answer = "";
  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers({ "Content-Type": "application/json" }),
      body: JSON.stringify({
        model, messages: conversation, stream: true,
        max_tokens: Number($("chat-max-tokens").value), temperature: Number($("chat-temperature").value),
      }),
    });
    if (!r.ok) {
      const body = await r.json().catch(() => ({}));
      if (r.status === 401) askForKey("That key was refused; enter the cluster's API key.");
      throw new Error((body.error && body.error.message) || "HTTP " + r.status);
    }
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    let chunks = 0;
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        if (!event.startsWith("data: ") || event === "data: [DONE]") continue;
        const chunk = JSON.parse(event.slice(6));
        if (chunk.error) throw new Error(chunk.error.message);
        const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta.content;
        if (delta) {
          answer += delta;
          out.textContent = answer;
          out.setAttribute("data-chunks", String(++chunks));
        }
      }
    }
    conversation.push({ role: "assistant", content: answer });
    out.setAttribute("data-state", "done");
  } catch (err) {
    conversation.pop();
    out.className = "msg error";
    out.textContent = answer + (answer ? "\n" : "") + "error: " + err.message;
    out.setAttribute("data-state", "error");
  } finally {
    $("chat-send").disabled = false;
    refreshHistory();
  }
});

if (document.body.dataset.keyRequired === "true" && !sessionStorage.getItem(KEY)) askForKey(null);
tick();
refreshHistory();
setInterval(tick, 1000);
setInterval(refreshHistory, 2000);
