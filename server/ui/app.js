// ctxsteer playground: plain JS against the server's own OpenAI-compatible API (same origin).
// Nothing is fetched from elsewhere. Every API error is shown with the server's message.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "ctxsteer.apiKey";
let controllers = [];
let measureRefused = null; // the server's message when it cannot measure context attention

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

// The server's OpenAI-shaped error message, whatever shape the body has.
async function errorMessage(resp) {
  const text = await resp.text();
  try {
    const body = JSON.parse(text);
    if (body && body.error && body.error.message) return `${resp.status}: ${body.error.message}`;
  } catch (_) { /* not JSON */ }
  return `${resp.status} ${resp.statusText}${text ? ": " + text.slice(0, 300) : ""}`;
}

async function api(path, body) {
  const resp = await fetch(path, {
    method: body === undefined ? "GET" : "POST",
    headers: headers(),
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (!resp.ok) throw new Error(await errorMessage(resp));
  return resp.json();
}

async function loadModels() {
  const select = $("model");
  try {
    const list = await api("/v1/models");
    select.innerHTML = "";
    for (const m of list.data) {
      const opt = document.createElement("option");
      opt.value = m.id;
      opt.textContent = m.max_model_len ? `${m.id} (${m.max_model_len} tokens)` : m.id;
      select.appendChild(opt);
    }
    clearError();
  } catch (e) {
    select.innerHTML = '<option value="">(no models: see the error)</option>';
    showError("Could not list models: " + e.message);
  }
}

function messages() {
  const msgs = [];
  const system = $("system").value.trim();
  if (system) msgs.push({ role: "system", content: system });
  const docs = $("documents").value.trim();
  const question = $("question").value.trim();
  const user = [docs, question].filter(Boolean).join("\n\n");
  msgs.push({ role: "user", content: user });
  return msgs;
}

// The steered side's strength: the slider, or "auto" bounded by it (the server reports its choice).
function steering(strength) {
  const auto = strength !== 1 && $("strength-auto").checked;
  const s = auto ? { strength: "auto", max_strength: Math.max(strength, 1) } : { strength: strength };
  const targets = [...document.querySelectorAll('input[name="target"]:checked')].map((c) => c.value);
  s.targets = targets;
  const spans = $("spans").value.split("\n").map((l) => l.trim()).filter(Boolean);
  if (spans.length) s.spans = spans;
  const layers = $("layers").value.trim();
  if (layers && layers !== "all") s.layers = layers.split(",").map((x) => Number(x.trim()));
  const profile = $("head-profile").value.trim();
  if (profile && profile !== "none") s.head_profile = profile;
  return s;
}

// The "Output format" box as a `response_format`: null when empty (free text), json_schema when the schema
// box is filled, json_object when only the box is ticked. A schema that is not a JSON object shows an inline
// error under the box and returns {error}: nothing is sent.
function responseFormat() {
  const box = $("schema");
  const err = $("schema-error");
  err.hidden = true;
  err.textContent = "";
  box.classList.remove("invalid");
  const text = box.value.trim();
  if (!text) return $("json-object").checked ? { format: { type: "json_object" } } : { format: null };
  let schema, problem = null;
  try {
    schema = JSON.parse(text);
    if (schema === null || typeof schema !== "object" || Array.isArray(schema)) {
      problem = "The schema must be a JSON object, like {\"type\": \"object\", …}.";
    }
  } catch (e) {
    problem = "Not valid JSON: " + e.message;
  }
  if (problem !== null) {
    err.textContent = problem;
    err.hidden = false;
    box.classList.add("invalid");
    $("output-format").open = true;
    return { error: problem };
  }
  return { format: { type: "json_schema", json_schema: { name: "ui_schema", schema: schema } } };
}

// A JSON answer pretty-printed; any other text as it is.
function prettyJson(text) {
  try {
    return JSON.stringify(JSON.parse(text), null, 2);
  } catch (_) {
    return text;
  }
}

// Under a JSON output format: show the answer pretty-printed when it parses, say so when it does not.
function showJson(res, textEl, metaEl) {
  const shown = prettyJson(res.text);
  if (shown !== res.text) textEl.textContent = shown;
  else {
    try { JSON.parse(res.text); } catch (_) { metaEl.textContent += " · not valid JSON"; }
  }
  return shown;
}

function request(strength, format) {
  const body = {
    model: $("model").value || undefined,
    messages: messages(),
    max_tokens: Number($("max-tokens").value) || 96,
    temperature: Number($("temperature").value),
    stream: true,
    stream_options: { include_usage: true },
    steering: steering(strength),
  };
  if (format) body.response_format = format;
  if (measureRefused === null) {
    // Where it looked: per-token attention on the context, labelled with the tokens (logprobs).
    body.report = { context_attention: true };
    body.logprobs = true;
  }
  return body;
}

// Stream one chat completion into `textEl`; resolves to {text, info, usage, tokens, context}.
// A server that cannot measure context attention refuses `report` with 400 unsupported_report: the
// request is then sent again without it, and the panel shows the server's reason.
async function stream(body, textEl, metaEl) {
  try {
    return await streamOnce(body, textEl, metaEl);
  } catch (e) {
    if (e.code !== "unsupported_report") throw e;
    measureRefused = e.message;
    delete body.report;
    delete body.logprobs;
    return streamOnce(body, textEl, metaEl);
  }
}

async function streamOnce(body, textEl, metaEl) {
  const ctrl = new AbortController();
  controllers.push(ctrl);
  textEl.textContent = "";
  textEl.classList.add("streaming");
  metaEl.textContent = "";
  const t0 = performance.now();
  let text = "", info = null, usage = null, finish = null, context = null;
  const tokens = [];
  try {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: ctrl.signal,
    });
    if (!resp.ok) {
      const copy = resp.clone();
      const err = new Error(await errorMessage(resp));
      try { err.code = (await copy.json()).error.code; } catch (_) { /* not JSON */ }
      throw err;
    }
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const frame = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        for (const line of frame.split("\n")) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") continue;
          const chunk = JSON.parse(data);
          if (chunk.error) throw new Error(chunk.error.message || JSON.stringify(chunk.error));
          for (const c of chunk.choices || []) {
            if (c.delta && c.delta.content) {
              text += c.delta.content;
              textEl.textContent = text;
            }
            if (c.logprobs && c.logprobs.content) for (const lp of c.logprobs.content) tokens.push(lp.token);
            if (c.finish_reason) finish = c.finish_reason;
          }
          if (chunk.steering) info = chunk.steering;
          if (chunk.context_attention) context = chunk.context_attention;
          if (chunk.usage) usage = chunk.usage;
        }
      }
    }
  } finally {
    textEl.classList.remove("streaming");
    controllers = controllers.filter((c) => c !== ctrl);
  }
  const secs = (performance.now() - t0) / 1000;
  const parts = [];
  if (info && info.auto) {
    parts.push(`auto: chose strength ${info.strength.toFixed(2)} (context share ${pct(info.auto.unsteered_ratio)} ` +
      `unsteered, predicted ${pct(info.auto.predicted_ratio)}, target ${pct(info.auto.target_ratio)})`);
  } else if (info && info.strength === 1) parts.push("steering off (strength 1)");
  else if (info) parts.push(`strength ${info.strength}, ${info.steered_tokens}/${info.prompt_tokens} prompt tokens steered`);
  if (usage) parts.push(`${usage.completion_tokens} tokens in ${secs.toFixed(1)} s`);
  if (finish) parts.push(`finish: ${finish}`);
  metaEl.textContent = parts.join(" · ");
  return { text, info, usage, tokens, context };
}

function pct(x) {
  return x === null || x === undefined ? "–" : (100 * x).toFixed(1) + "%";
}

// Word-level LCS diff: marks the words of each answer that the other does not share.
function diffWords(a, b) {
  const wa = a.split(/(\s+)/), wb = b.split(/(\s+)/);
  const n = wa.length, m = wb.length;
  const dp = Array.from({ length: n + 1 }, () => new Int32Array(m + 1));
  for (let i = n - 1; i >= 0; i--)
    for (let j = m - 1; j >= 0; j--)
      dp[i][j] = wa[i] === wb[j] ? dp[i + 1][j + 1] + 1 : Math.max(dp[i + 1][j], dp[i][j + 1]);
  const keepA = new Array(n).fill(false), keepB = new Array(m).fill(false);
  for (let i = 0, j = 0; i < n && j < m;) {
    if (wa[i] === wb[j]) { keepA[i++] = true; keepB[j++] = true; }
    else if (dp[i + 1][j] >= dp[i][j + 1]) i++;
    else j++;
  }
  return [[wa, keepA], [wb, keepB]];
}

function renderDiff(el, words, keep) {
  el.textContent = "";
  words.forEach((w, i) => {
    if (keep[i] || /^\s*$/.test(w)) {
      el.appendChild(document.createTextNode(w));
    } else {
      const mark = document.createElement("mark");
      mark.className = "diff";
      mark.textContent = w;
      el.appendChild(mark);
    }
  });
}

function strength() {
  return Number($("strength").value);
}

function strengthTitle() {
  return $("strength-auto").checked ? `Strength auto (up to ${strength()})` : `Strength ${strength()}`;
}

function busy(on) {
  for (const id of ["run", "compare", "show-spans"]) $(id).disabled = on;
  $("stop").disabled = !on;
}

async function run() {
  const { format, error } = responseFormat();
  if (error !== undefined) return;
  clearError();
  busy(true);
  $("answer-base").hidden = true;
  $("title-steered").textContent = strengthTitle();
  try {
    const res = await stream(request(strength(), format), $("text-steered"), $("meta-steered"));
    if (format) showJson(res, $("text-steered"), $("meta-steered"));
    showLooked([[strengthTitle(), res]]);
  } catch (e) {
    if (e.name !== "AbortError") showError(e.message);
  } finally {
    busy(false);
  }
}

async function compare() {
  const { format, error } = responseFormat();
  if (error !== undefined) return;
  clearError();
  busy(true);
  $("answer-base").hidden = false;
  $("title-steered").textContent = strengthTitle() + " (steered)";
  try {
    // Both at once: the server batches them, and one failing must not hide the other's answer.
    const [base, steered] = await Promise.allSettled([
      stream(request(1, format), $("text-base"), $("meta-base")),
      stream(request(strength(), format), $("text-steered"), $("meta-steered")),
    ]);
    const failed = [base, steered].find((r) => r.status === "rejected");
    if (failed) throw failed.reason;
    let [ta, tb] = [base.value.text, steered.value.text];
    if (format) {
      ta = showJson(base.value, $("text-base"), $("meta-base"));
      tb = showJson(steered.value, $("text-steered"), $("meta-steered"));
    }
    const [[wa, ka], [wb, kb]] = diffWords(ta, tb);
    renderDiff($("text-base"), wa, ka);
    renderDiff($("text-steered"), wb, kb);
    const same = base.value.text === steered.value.text;
    $("meta-steered").textContent += same ? " · identical to strength 1" : " · differences highlighted";
    showLooked([["Strength 1 (unsteered)", base.value], [strengthTitle() + " (steered)", steered.value]]);
    await showSpans();
  } catch (e) {
    if (e.name !== "AbortError") showError(e.message);
  } finally {
    busy(false);
  }
}

// Byte-level BPE and SentencePiece markers shown as the whitespace they stand for.
function pieceText(piece) {
  return piece.replace(/Ġ|▁/g, " ").replace(/Ċ|<0x0A>/g, "\n").replace(/ĉ/g, "\t");
}

async function showSpans() {
  clearError();
  const view = $("spans-view");
  try {
    const body = { model: $("model").value || undefined, messages: messages(), steering: steering(strength()),
      return_token_strs: true };
    const res = await api("/tokenize", body);
    const steered = new Uint8Array(res.count);
    for (const [s, e] of res.steered_spans) steered.fill(1, s, e);
    view.textContent = "";
    let run = null, runSteered = -1;
    res.token_strs.forEach((piece, i) => {
      if (steered[i] !== runSteered) {
        run = document.createElement("span");
        run.className = steered[i] ? "steered" : "plain";
        view.appendChild(run);
        runSteered = steered[i];
      }
      run.textContent += pieceText(piece);
    });
    $("spans-meta").textContent =
      `${res.steered_tokens} of ${res.count} prompt tokens steered (highlighted); ` +
      `at strength ${strength()} every other prompt token gets ${(1 / strength()).toPrecision(3)}× its attention.`;
  } catch (e) {
    showError(e.message);
  }
}

// One strip per answer: each generated token shaded by the share of attention its prediction paid to the
// context (the steered tokens), as served; steered answers also get the as-if-unsteered strip.
function showLooked(results) {
  const panel = $("looked");
  panel.textContent = "";
  if (measureRefused !== null) {
    panel.textContent = "Not available from this server: " + measureRefused;
    return;
  }
  if (!results || !results.some(([, r]) => r && r.context)) {
    panel.textContent = "Run or compare to see, per generated token, how much attention went to your context.";
    return;
  }
  for (const [title, r] of results) {
    if (!r || !r.context) continue;
    const choice = r.context.choices[0];
    const head = document.createElement("h3");
    head.textContent = `${title}: ${pct(choice.ratio)} of attention on the context`;
    const steered = r.info && r.info.strength !== 1;
    if (steered) head.textContent += ` (${pct(choice.unsteered_ratio)} without the steering bias)`;
    panel.appendChild(head);
    panel.appendChild(strip("as served", choice.per_token, r.tokens));
    if (steered) panel.appendChild(strip("as if unsteered", choice.unsteered_per_token, r.tokens));
  }
  const note = document.createElement("p");
  note.className = "hint";
  note.textContent = "Darker = more attention on the context (mean over layers and heads). " +
    "\"As if unsteered\" removes the bias from the same scores, layer by layer.";
  panel.appendChild(note);
}

function strip(label, values, tokens) {
  const row = document.createElement("div");
  row.className = "strip";
  const name = document.createElement("span");
  name.className = "strip-label";
  name.textContent = label;
  row.appendChild(name);
  values.forEach((v, i) => {
    const cell = document.createElement("span");
    cell.className = "cell";
    const tok = tokens && tokens.length === values.length ? tokens[i] : "·";
    cell.textContent = tok.replace(/\n/g, "⏎") || "·";
    cell.style.background = `rgba(217, 119, 6, ${Math.min(1, v).toFixed(3)})`;
    cell.title = `${(100 * v).toFixed(1)}% on the context`;
    cell.dataset.value = v;
    row.appendChild(cell);
  });
  return row;
}

function init() {
  $("api-key").value = sessionStorage.getItem(KEY_STORE) || "";
  $("api-key").addEventListener("change", () => {
    sessionStorage.setItem(KEY_STORE, $("api-key").value.trim());
    loadModels();
  });
  $("reload-models").addEventListener("click", loadModels);
  $("strength").addEventListener("input", () => { $("strength-out").value = $("strength").value; });
  $("doc-file").addEventListener("change", async (ev) => {
    for (const file of ev.target.files) {
      const text = await file.text();
      const doc = $("documents");
      doc.value = (doc.value.trim() ? doc.value.trimEnd() + "\n\n" : "") + text;
    }
    ev.target.value = "";
  });
  $("schema").addEventListener("input", () => {
    $("schema-error").hidden = true;
    $("schema").classList.remove("invalid");
  });
  $("run").addEventListener("click", run);
  $("compare").addEventListener("click", compare);
  $("show-spans").addEventListener("click", showSpans);
  $("stop").addEventListener("click", () => controllers.forEach((c) => c.abort()));
  showLooked(null);
  loadModels();
}

init();
