// The daemon's page: the cluster as a ring, live from /v1/status/stream, and a chat that
// streams from /v1/chat/completions. No libraries: the page must work with no internet.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY = "ringinfer.apiKey";
const SVG = "http://www.w3.org/2000/svg";
let status = null;

// ------------------------------------------------------------------ API key

function headers(extra = {}) {
  const key = localStorage.getItem(KEY);
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

function askForKey(wrong) {
  $("key-form").hidden = false;
  $("key-button").hidden = false;
  $("key-input").placeholder = wrong ? "that key was refused; try again" : "API key";
  $("key-input").focus();
}

$("key-form").addEventListener("submit", (e) => {
  e.preventDefault();
  localStorage.setItem(KEY, $("key-input").value.trim());
  $("key-input").value = "";
  $("key-form").hidden = true;
  watchStatus();
});
$("key-button").addEventListener("click", () => askForKey(false));

// ------------------------------------------------------------------ server-sent events

// Yields each event's parsed `data:` from a fetch response (EventSource cannot send a key).
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
      if (data === "[DONE]") return;
      if (data) yield JSON.parse(data);
    }
  }
}

async function errorText(response) {
  try {
    return (await response.json()).error.message;
  } catch {
    return `HTTP ${response.status}`;
  }
}

// ------------------------------------------------------------------ cluster

let watching = null;

async function watchStatus() {
  if (watching) watching.abort();
  const control = (watching = new AbortController());
  while (!control.signal.aborted) {
    try {
      const response = await fetch("/v1/status/stream", { headers: headers(), signal: control.signal });
      if (response.status === 401) {
        setConnection("API key needed", "fail");
        askForKey(Boolean(localStorage.getItem(KEY)));
        return;
      }
      if (!response.ok) throw new Error(await errorText(response));
      setConnection("live", "ok");
      for await (const s of events(response)) render(s);
    } catch (e) {
      if (control.signal.aborted) return;
    }
    setConnection("daemon unreachable, retrying…", "fail");
    await new Promise((r) => setTimeout(r, 1000));
  }
}

function setConnection(text, level) {
  const el = $("connection");
  el.textContent = text;
  el.className = `pill ${level}`;
}

function mib(bytes) {
  return bytes >= 2 ** 30 ? `${(bytes / 2 ** 30).toFixed(1)} GiB` : `${Math.round(bytes / 2 ** 20)} MiB`;
}

function el(tag, className, text) {
  const e = document.createElement(tag);
  if (className) e.className = className;
  if (text !== undefined) e.textContent = text;
  return e;
}

function svg(tag, attrs, text) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

// Stages in ring order first, then members that hold no layers.
function ringOrder(nodes) {
  const staged = nodes.filter((n) => n.layers).sort((a, b) => a.layers[0] - b.layers[0]);
  return [...staged, ...nodes.filter((n) => !n.layers)];
}

function render(s) {
  status = s;
  // e.g. "Qwen3-30B-A3B · qwen3_moe · 128 experts, 8 active · 3.4B active of 30.5B · 48 layers"
  $("model").textContent = [s.model, s.model_summary, `${s.n_layers} layers`].filter(Boolean).join(" · ");
  $("cluster-name").textContent = `'${s.cluster}' · ${s.nodes.length} node${s.nodes.length === 1 ? "" : "s"} · ${s.objective}`;
  const plan = $("plan");
  plan.textContent = s.live ? `plan epoch ${s.epoch}` : s.plan_error ? "no plan" : "planning…";
  plan.className = `pill ${s.live ? "ok" : s.plan_error ? "fail" : "warn"}`;
  $("predicted").hidden = !s.predicted;
  if (s.predicted) {
    $("predicted").textContent = `predicted ${s.predicted.tpot_ms.toFixed(1)} ms/token (${s.predicted.tokens_per_s.toFixed(1)} tok/s)`;
  }
  const nodes = ringOrder(s.nodes);
  drawRing(nodes, s);
  drawCards(nodes, s);
  drawProblems(s.problems);
}

function rttBetween(s, a, b) {
  const link = s.links.find((l) => (l.from === a && l.to === b) || (l.from === b && l.to === a));
  return link ? link.rtt_ms : null;
}

function drawRing(nodes, s) {
  const ring = $("ring");
  ring.replaceChildren();
  const defs = svg("defs", {});
  const marker = svg("marker", { id: "arrow", viewBox: "0 0 10 10", refX: 10, refY: 5, markerWidth: 6, markerHeight: 6, orient: "auto-start-reverse" });
  marker.append(svg("path", { d: "M 0 0 L 10 5 L 0 10 z", fill: "#6b7385" }));
  defs.append(marker);
  ring.append(defs);
  const cx = 200, cy = 150, r = nodes.length > 1 ? 105 : 0, nodeR = 30;
  const at = nodes.map((_, i) => {
    const a = -Math.PI / 2 + (2 * Math.PI * i) / nodes.length;
    return [cx + r * Math.cos(a), cy + r * Math.sin(a)];
  });
  const stages = nodes.filter((n) => n.layers).length;
  for (let i = 0; i < stages && stages > 1; i++) {
    const j = (i + 1) % stages;
    const [x1, y1] = at[i], [x2, y2] = at[j];
    const d = Math.hypot(x2 - x1, y2 - y1);
    const ux = (x2 - x1) / d, uy = (y2 - y1) / d;
    const side = stages === 2 ? 8 : 0; // two stages: the way there and back side by side
    const ox = -uy * side, oy = ux * side;
    const line = svg("line", { class: "link", x1: x1 + ux * nodeR + ox, y1: y1 + uy * nodeR + oy, x2: x2 - ux * nodeR + ox, y2: y2 - uy * nodeR + oy });
    if (j === 0) line.setAttribute("stroke-dasharray", "4 3"); // candidates back to the requester
    ring.append(line);
    const rtt = rttBetween(s, nodes[i].id, nodes[j].id);
    if (rtt !== null) {
      const lx = (x1 + x2) / 2 + ox * 2.5 + (side ? 0 : uy * 12), ly = (y1 + y2) / 2 + oy * 2.5 - (side ? 0 : ux * 12);
      ring.append(svg("text", { class: "rtt", x: lx, y: ly, "text-anchor": "middle" }, `${rtt.toFixed(2)} ms`));
    }
  }
  nodes.forEach((n, i) => {
    const [x, y] = at[i];
    const bad = !["ready", "idle"].includes(n.state);
    ring.append(svg("circle", { class: `node${n.id === s.node ? " self" : ""}${bad ? " bad" : ""}`, cx: x, cy: y, r: nodeR }));
    ring.append(svg("text", { class: "name", x, y: y - 2 }, n.name));
    ring.append(svg("text", { class: "layers", x, y: y + 11 }, n.layers ? `${n.layers[0]}–${n.layers[1]}` : "no layers"));
  });
}

function drawCards(nodes, s) {
  const box = $("nodes");
  box.replaceChildren();
  for (const n of nodes) {
    const card = el("div", "node-card");
    card.dataset.nodeId = n.id;
    const title = el("div", "title");
    const name = el("span", "name", n.name + (n.id === s.node ? " (this node)" : ""));
    const state = el("span", n.state === "ready" ? "state-ready" : "state-other", n.state);
    title.append(name, state);
    const layers = el("div", "layers", n.layers ? `layers ${n.layers[0]}–${n.layers[1]} of ${s.n_layers}` : "no layers");
    const compute = n.flops ? `${(n.flops / 1e9).toFixed(0)} GFLOP/s, ${n.layer_ms.toFixed(2)} ms/layer` : "not measured";
    const facts = [
      `${n.device_name || n.device} · ${n.quantization}`,
      compute,
      n.rtt_ms !== null ? `RTT ${n.rtt_ms.toFixed(2)} ms` : n.id === s.node ? "" : "RTT —",
      `${n.requests} request${n.requests === 1 ? "" : "s"} in flight`,
      `batch ${n.batch.toFixed(1)} · ${n.tokens_per_s.toFixed(1)} tok/s · ${n.waiting} waiting, ${n.queued} queued`,
      n.address,
    ].filter(Boolean);
    const memory = el("div", "facts", `weights ${mib(n.weights)} of ${mib(n.memory)} offered (${mib(n.memory_total)} total)`);
    const bar = el("div", "bar");
    const fill = el("div");
    fill.style.width = `${Math.min(100, (100 * n.weights) / Math.max(1, n.memory)).toFixed(1)}%`;
    bar.append(fill);
    card.append(title, layers, el("div", "facts", facts.join(" · ")), memory, bar);
    box.append(card);
  }
}

function drawProblems(problems) {
  const box = $("problems");
  box.replaceChildren();
  for (const p of problems) {
    const item = el("div", `problem ${p.level}`);
    item.append(el("div", "", p.problem), el("div", "fix", `fix: ${p.fix}`));
    box.append(item);
  }
}

// ------------------------------------------------------------------ chat

const history = [];
let answering = null;

function addMessage(role, text) {
  const m = el("div", `message ${role}`, text);
  $("messages").append(m);
  m.scrollIntoView({ block: "end" });
  return m;
}

async function send(text) {
  history.push({ role: "user", content: text });
  addMessage("user", text);
  const out = addMessage("assistant", "");
  const control = (answering = new AbortController());
  $("send").disabled = true;
  $("stop").disabled = false;
  const began = performance.now();
  let first = null, last = null, tokens = 0, reply = "";
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers({ "Content-Type": "application/json" }),
      signal: control.signal,
      body: JSON.stringify({
        model: status ? status.model : undefined,
        messages: history,
        stream: true,
        stream_options: { include_usage: true },
        temperature: Number($("temperature").value),
        max_tokens: Number($("max-tokens").value),
      }),
    });
    if (response.status === 401) askForKey(Boolean(localStorage.getItem(KEY)));
    if (!response.ok) throw new Error(await errorText(response));
    for await (const chunk of events(response)) {
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) tokens = chunk.usage.completion_tokens;
      const piece = chunk.choices.length ? chunk.choices[0].delta.content : "";
      if (piece) {
        last = performance.now();
        if (first === null) first = last;
        reply += piece;
        out.textContent = reply;
        out.scrollIntoView({ block: "end" });
      }
    }
    history.push({ role: "assistant", content: reply });
    const rate = tokens > 1 && last > first ? ((tokens - 1) * 1000) / (last - first) : 0;
    $("chat-stats").textContent = first === null ? "no text" :
      `time to first token ${((first - began) / 1000).toFixed(2)} s · ${rate.toFixed(1)} tokens/s · ${tokens} tokens`;
  } catch (e) {
    history.pop();
    if (control.signal.aborted) {
      $("chat-stats").textContent = "stopped";
    } else {
      out.className = "message error";
      out.textContent = `error: ${e.message}`;
    }
  } finally {
    answering = null;
    $("send").disabled = false;
    $("stop").disabled = true;
    out.dataset.done = "true";
  }
}

$("chat-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || answering) return;
  $("prompt").value = "";
  send(text);
});
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) {
    e.preventDefault();
    $("chat-form").requestSubmit();
  }
});
$("stop").addEventListener("click", () => answering && answering.abort());
$("clear").addEventListener("click", () => {
  if (answering) answering.abort();
  history.length = 0;
  $("messages").replaceChildren();
  $("chat-stats").textContent = "";
});

watchStatus();
