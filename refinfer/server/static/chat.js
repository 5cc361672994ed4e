// refinfer's chat page: plain JavaScript, no build step, nothing loaded from another host.
//
// It talks to the server's OpenAI-compatible API:
//   GET  v1/models             -> the model id shown in the header and sent with each request
//   POST v1/chat/completions   -> stream: true, logprobs: true, top_logprobs: 5,
//                                 stream_options: {include_usage: true}
// and reads the Server-Sent Events stream itself from fetch()'s ReadableStream (see readSSE).
//
// Each assistant turn is kept twice: as text (the concatenated delta.content, which is what the
// server released after holding back stop strings and incomplete UTF-8) and as tokens (one span
// per choices[0].logprobs.content entry, coloured by exp(logprob), with the top alternatives on
// hover). The checkbox "per-token view" switches between the two (a turn without logprobs always
// shows its text).

"use strict";

const TOP_LOGPROBS = 5;

const $ = (id) => document.getElementById(id);
const el = {
  model: $("model"), status: $("status"), messages: $("messages"), composer: $("composer"),
  prompt: $("prompt"), send: $("send"), stop: $("stop"), system: $("system"), clear: $("clear"),
  temperature: $("temperature"), topP: $("top-p"), topK: $("top-k"), minP: $("min-p"),
  maxTokens: $("max-tokens"), seed: $("seed"), showTokens: $("show-tokens"), apiKey: $("api-key"),
  tooltip: $("tooltip"),
};

let modelId = null;     // from GET v1/models; null: let the server choose
let history = [];       // the conversation so far, as OpenAI messages (without the system prompt)
let controller = null;  // the AbortController of the request in flight

// ---------------------------------------------------------------------------------------------
// Status line. data-state is one of: connecting (the page has not heard from the server yet),
// loading (the server is loading the model), idle, generating, done, stopped, error.

function setStatus(state, text) {
  el.status.dataset.state = state;
  el.status.textContent = text;
}

function headers() {
  const h = {"Content-Type": "application/json"};
  const key = el.apiKey.value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

// An OpenAI error object {"error": {"message", ...}} as one line of text.
function errorText(obj, fallback) {
  if (obj && obj.error) {
    const e = obj.error;
    return (typeof e === "string") ? e : (e.message || JSON.stringify(e));
  }
  return fallback;
}

// A non-200 response: its error object's message, or the status line when the body is not one.
async function responseError(resp) {
  const fallback = `HTTP ${resp.status} ${resp.statusText}`;
  try {
    return `${fallback}: ${errorText(await resp.json(), "")}`.replace(/: $/, "");
  } catch (_) {
    return fallback;
  }
}

async function loadModel() {
  try {
    const resp = await fetch("v1/models", {headers: headers()});
    const retry = resp.headers.get("Retry-After");
    if (resp.status === 503 && retry !== null) {   // the model is still loading: ask again then
      setStatus("loading", await responseError(resp));
      setTimeout(loadModel, 1000 * Math.max(1, Number(retry) || 1));
      return;
    }
    if (!resp.ok) {
      setStatus("error", await responseError(resp));
      return;
    }
    const body = await resp.json();
    modelId = body.data && body.data.length ? body.data[0].id : null;
    el.model.textContent = modelId ?? "(none)";
    setStatus("idle", "ready");
  } catch (e) {
    setStatus("error", "cannot reach the server: " + e.message);
  }
}

// ---------------------------------------------------------------------------------------------
// Server-Sent Events, as the HTML standard parses them: lines end with \n, \r\n or \r; a line
// "data: x" (one optional space after the colon) adds x to the event's data, several data lines
// joining with \n; a line starting with ":" is a comment (the server's keep-alive pings); an
// empty line dispatches the event. Yields each event's data string.

async function* readSSE(body) {
  const reader = body.getReader();
  const decoder = new TextDecoder("utf-8");   // {stream: true} below keeps split UTF-8 characters whole
  let buffer = "";
  let data = [];
  try {
    for (;;) {
      const {value, done} = await reader.read();
      buffer += done ? decoder.decode() : decoder.decode(value, {stream: true});
      // A lone "\r" at the end may be the first half of "\r\n": wait for more unless the stream ended.
      const lines = buffer.split(/\r\n|\r(?!$)|\n/);
      buffer = done ? "" : lines.pop();
      for (const raw of lines) {
        const line = raw.endsWith("\r") ? raw.slice(0, -1) : raw;
        if (line === "") {
          if (data.length) yield data.join("\n");
          data = [];
        } else if (line.startsWith(":")) {
          continue;
        } else if (line.startsWith("data:")) {
          data.push(line.slice(line.startsWith("data: ") ? 6 : 5));
        }
        // other fields (event:, id:, retry:) are not used by the OpenAI stream
      }
      if (done) break;
    }
    if (data.length) yield data.join("\n");   // a stream that ends without the final empty line
  } finally {
    reader.releaseLock();
  }
}

// ---------------------------------------------------------------------------------------------
// Rendering

// exp(logprob) as a background colour: red (p = 0) through yellow to green (p = 1).
function probColour(p) {
  return `hsl(${Math.round(120 * p)}, 80%, 80%)`;
}

function percent(p) {
  return p >= 0.9995 ? "100%" : p < 0.0001 ? p.toExponential(1) : (100 * p).toFixed(2) + "%";
}

// How a token reads in the token view: a token whose bytes are not whole UTF-8 on their own (part
// of a multi-byte character) shows its bytes, newlines and tabs show a visible mark.
const strictUTF8 = new TextDecoder("utf-8", {fatal: true});
function tokenLabel(entry) {
  if (Array.isArray(entry.bytes)) {
    try {
      strictUTF8.decode(new Uint8Array(entry.bytes));
    } catch (_) {
      return {text: entry.bytes.map((b) => "\\x" + b.toString(16).padStart(2, "0")).join(""), partial: true};
    }
  }
  return {text: entry.token.replace(/\n/g, "↵\n").replace(/\t/g, "→\t"), partial: false};
}

// JSON.stringify shows a token's spaces and escapes, as tooltips must.
function quoted(entry) {
  const label = tokenLabel(entry);
  return label.partial ? label.text : JSON.stringify(entry.token);
}

function scrollDown() {
  el.messages.scrollTop = el.messages.scrollHeight;
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "message " + role;
  const who = document.createElement("div");
  who.className = "role";
  who.textContent = role;
  div.appendChild(who);
  const body = document.createElement("div");
  body.className = "text";
  body.textContent = text;
  div.appendChild(body);
  el.messages.appendChild(div);
  scrollDown();
  return div;
}

// An assistant turn being streamed: .text gets the text pieces, .tokens one span per token.
function addAssistant() {
  const div = addMessage("assistant", "");
  const tokens = document.createElement("div");
  tokens.className = "tokens";
  div.appendChild(tokens);
  const info = document.createElement("div");
  info.className = "usage";
  div.appendChild(info);
  return {div, text: div.querySelector(".text"), tokens, info, content: "", nTokens: 0};
}

// One generated token: choices[0].logprobs.content[i] = {token, logprob, bytes, top_logprobs}.
// data-logprob is JavaScript's shortest round-tripping form of the number the server sent.
function addToken(turn, entry) {
  const span = document.createElement("span");
  const label = tokenLabel(entry);
  span.className = label.partial ? "token partial" : "token";
  span.textContent = label.text;
  span.dataset.token = entry.token;
  span.dataset.logprob = String(entry.logprob);
  if (Array.isArray(entry.bytes)) span.dataset.bytes = JSON.stringify(entry.bytes);
  span.dataset.index = String(turn.nTokens);
  span.style.backgroundColor = probColour(Math.exp(entry.logprob));
  span.tokenEntry = entry;   // for the tooltip
  turn.tokens.appendChild(span);
  turn.nTokens += 1;
  turn.div.classList.add("has-tokens");
}

function showError(div, message) {
  const e = document.createElement("div");
  e.className = "error";
  e.textContent = message;
  div.appendChild(e);
  scrollDown();
}

// ---------------------------------------------------------------------------------------------
// Tooltip: the hovered token's probability and its top alternatives, best first.

function showTooltip(span) {
  const entry = span.tokenEntry;
  const tip = el.tooltip;
  tip.replaceChildren();
  const head = document.createElement("div");
  head.className = "tip-head";
  head.textContent = `#${span.dataset.index} ${quoted(entry)}  p = ${percent(Math.exp(entry.logprob))}` +
                     `  (logprob ${entry.logprob.toFixed(4)})`;
  tip.appendChild(head);
  const table = document.createElement("table");
  const alts = entry.top_logprobs || [];
  for (const [rank, alt] of alts.entries()) {
    const row = table.insertRow();
    if (alt.token === entry.token && alt.logprob === entry.logprob) row.className = "chosen";
    row.dataset.logprob = String(alt.logprob);
    if (Array.isArray(alt.bytes)) row.dataset.bytes = JSON.stringify(alt.bytes);
    row.insertCell().textContent = String(rank + 1);
    row.insertCell().textContent = quoted(alt);
    const p = row.insertCell();
    p.className = "p";
    p.textContent = percent(Math.exp(alt.logprob));
    const bar = document.createElement("span");
    bar.className = "bar";
    bar.style.width = (100 * Math.exp(alt.logprob)).toFixed(1) + "%";
    bar.style.backgroundColor = probColour(Math.exp(alt.logprob));
    row.insertCell().appendChild(bar);
  }
  tip.appendChild(table);
  if (!alts.some((a) => a.token === entry.token && a.logprob === entry.logprob)) {
    const note = document.createElement("div");
    note.className = "tip-note";
    note.textContent = alts.length ? `the sampled token is not among the top ${alts.length}` : "no alternatives sent";
    tip.appendChild(note);
  }
  tip.hidden = false;
  // below the token, kept inside the window
  const r = span.getBoundingClientRect();
  const w = tip.offsetWidth, h = tip.offsetHeight;
  let x = Math.min(r.left, window.innerWidth - w - 8);
  let y = r.bottom + 6;
  if (y + h > window.innerHeight) y = Math.max(8, r.top - h - 6);
  tip.style.left = Math.max(8, x) + "px";
  tip.style.top = y + "px";
}

el.messages.addEventListener("mouseover", (ev) => {
  const span = ev.target.closest(".token");
  if (span) showTooltip(span);
});
el.messages.addEventListener("mouseout", (ev) => {
  if (ev.target.closest(".token")) el.tooltip.hidden = true;
});

// ---------------------------------------------------------------------------------------------
// Sending

// A number field: its value, or undefined (the field is left out and the server's default used).
// The server checks the values (an integer field given 1.5 is its 400, shown as the error).
function numberField(input) {
  const v = input.value.trim();
  return v === "" ? undefined : Number(v);
}

// The request's JSON text.
function requestBody(messages) {
  const body = {
    messages,
    stream: true,
    stream_options: {include_usage: true},
    logprobs: true,
    top_logprobs: TOP_LOGPROBS,
    temperature: numberField(el.temperature),
    top_p: numberField(el.topP),
    top_k: numberField(el.topK),
    min_p: numberField(el.minP),
    max_tokens: numberField(el.maxTokens),
  };
  if (modelId !== null) body.model = modelId;
  let json = JSON.stringify(body);   // drops the undefined fields
  // A seed goes as the digits typed: seeds reach 2^64, beyond the integers a JS number holds.
  const seed = el.seed.value.trim();
  if (/^-?[0-9]+$/.test(seed)) json = json.slice(0, -1) + `,"seed":${seed}}`;
  else if (seed !== "") json = json.slice(0, -1) + `,"seed":${JSON.stringify(Number(seed))}}`;
  return json;
}

function setBusy(busy) {
  el.send.disabled = busy;
  el.stop.disabled = !busy;
}

async function send() {
  const text = el.prompt.value;
  if (!text.trim() || controller) return;
  el.prompt.value = "";
  const userDiv = addMessage("user", text);
  history.push({role: "user", content: text});
  const system = el.system.value;
  const messages = (system.trim() ? [{role: "system", content: system}] : []).concat(history);

  const turn = addAssistant();
  controller = new AbortController();
  setBusy(true);
  setStatus("generating", "generating…");
  const t0 = performance.now();
  let tFirst = null, finish = null, usage = null, error = null;
  try {
    const resp = await fetch("v1/chat/completions", {
      method: "POST", headers: headers(), body: requestBody(messages),
      signal: controller.signal,
    });
    if (!resp.ok) {
      error = await responseError(resp);
    } else {
      for await (const data of readSSE(resp.body)) {
        if (data === "[DONE]") break;
        const chunk = JSON.parse(data);
        if (chunk.error) {   // an error after the stream began
          error = errorText(chunk, "error");
          break;
        }
        if (chunk.usage) usage = chunk.usage;
        const choice = chunk.choices && chunk.choices[0];
        if (!choice) continue;   // the usage chunk has choices []
        if (choice.delta && choice.delta.content) {
          turn.content += choice.delta.content;
          turn.text.textContent = turn.content;
        }
        for (const entry of (choice.logprobs && choice.logprobs.content) || []) {
          if (tFirst === null) tFirst = performance.now();
          addToken(turn, entry);
        }
        if (choice.finish_reason) finish = choice.finish_reason;
        scrollDown();
      }
    }
  } catch (e) {
    error = (e.name === "AbortError") ? null : "request failed: " + e.message;
  }
  const stopped = controller.signal.aborted;
  controller = null;
  setBusy(false);

  // The turn joins the history when it produced text; a turn that failed before any text is
  // withdrawn together with its question, so that sending again does not repeat it.
  if (turn.content) {
    history.push({role: "assistant", content: turn.content});
  } else if (error || stopped) {
    history.pop();
    userDiv.classList.add("dropped");
    userDiv.title = "not part of the conversation sent to the model";
  }

  const seconds = (performance.now() - t0) / 1000;
  const parts = [];
  if (finish) parts.push(`finish: ${finish}`);
  if (stopped) parts.push("stopped");
  if (usage) {
    const cached = usage.prompt_tokens_details ? usage.prompt_tokens_details.cached_tokens : undefined;
    parts.push(`prompt ${usage.prompt_tokens} tokens` + (cached !== undefined ? ` (${cached} cached)` : ""));
    parts.push(`completion ${usage.completion_tokens} tokens`);
    turn.div.dataset.promptTokens = String(usage.prompt_tokens);
    turn.div.dataset.completionTokens = String(usage.completion_tokens);
  } else {
    parts.push(`${turn.nTokens} tokens`);
  }
  if (tFirst !== null) {
    const decode = (performance.now() - tFirst) / 1000;
    parts.push(`first token ${((tFirst - t0) / 1000).toFixed(2)} s`);
    if (turn.nTokens > 1 && decode > 0) parts.push(`${((turn.nTokens - 1) / decode).toFixed(1)} tokens/s`);
  }
  parts.push(`${seconds.toFixed(2)} s`);
  turn.info.textContent = parts.join(" · ");
  if (finish) turn.div.dataset.finishReason = finish;

  if (error) {
    showError(turn.div, error);
    setStatus("error", error);
  } else if (stopped) {
    setStatus("stopped", "stopped");
  } else {
    setStatus("done", "done" + (finish ? ` (${finish})` : ""));
  }
  el.prompt.focus();
}

// ---------------------------------------------------------------------------------------------
// Wiring

el.composer.addEventListener("submit", (ev) => {
  ev.preventDefault();
  send();
});
el.prompt.addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
    ev.preventDefault();
    send();
  }
});
el.stop.addEventListener("click", () => {
  if (controller) controller.abort();   // closes the connection: the server cancels the request
});
el.clear.addEventListener("click", () => {
  if (controller) controller.abort();
  history = [];
  el.messages.replaceChildren();
  el.tooltip.hidden = true;
});
function applyView() {
  document.body.classList.toggle("token-view", el.showTokens.checked);
}
el.showTokens.addEventListener("change", applyView);
el.apiKey.addEventListener("change", loadModel);
$("auth").addEventListener("submit", (ev) => {   // Enter in the key field
  ev.preventDefault();
  loadModel();
});

applyView();
loadModel();
