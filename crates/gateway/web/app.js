"use strict";
// MoltBot's chat page. It is a client of the public API like any other: it lists the caller's sessions
// (/api/sessions), streams answers from /api/chat over server-sent events, and stops an answer by closing the
// request, which cancels the generation on the server. A user's text is only ever set as text; an answer is
// Markdown, rendered by marked and then sanitized by DOMPurify (both vendored under /assets) before it becomes HTML.
// The plugins the user lets the model call (Settings) go with each message; their calls and results show in the
// conversation.

const $ = (id) => document.getElementById(id);
const KEY = "moltbot.api_key";
const SETTINGS = "moltbot.settings";
const TITLE_CHARS = 60;

marked.setOptions({ gfm: true, breaks: true });

const state = {
  key: localStorage.getItem(KEY) || "",
  session: null, // the open conversation's id; null for a new chat not yet sent
  controller: null, // aborts the answer being streamed
  plugins: new Set(), // the plugins the model may call
  pluginsListed: false, // whether the settings show the server's plugins yet
};

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

function headers() {
  const h = { "content-type": "application/json" };
  if (state.key) h.authorization = `Bearer ${state.key}`;
  return h;
}

async function errorOf(response) {
  const body = await response.json().catch(() => null);
  return new ApiError(response.status, body?.error?.message || `the server answered ${response.status}`);
}

async function api(method, path, body) {
  const response = await fetch(path, {
    method,
    headers: headers(),
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (!response.ok) throw await errorOf(response);
  return response.status === 204 ? null : response.json();
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

function report(error) {
  if (error.status === 401) askForKey(error.message);
  else setStatus(error.message, true);
}

// --- API key ------------------------------------------------------------------------------------------------

function askForKey(reason) {
  $("key-reason").textContent = reason || "This MoltBot asks for an API key.";
  $("key-input").value = state.key;
  if (!$("key-dialog").open) $("key-dialog").showModal();
}

// On submit rather than on the dialog's close event, which comes a task later: a message sent in between
// would be cleared away by the key change.
$("key-form").addEventListener("submit", (event) => {
  if (event.submitter?.value !== "save") return;
  const key = $("key-input").value.trim();
  if (key !== state.key) {
    state.key = key;
    if (key) localStorage.setItem(KEY, key);
    else localStorage.removeItem(KEY);
    newChat(); // the conversations shown belong to the previous key
  }
  setStatus("");
  loadConversations();
  loadPlugins();
});
$("key-button").addEventListener("click", () => askForKey());

// --- Settings: sent with each message (temperature) or given to each new conversation (system prompt) -------

function restoreSettings() {
  const saved = JSON.parse(localStorage.getItem(SETTINGS) || "{}");
  $("temperature").value = saved.temperature ?? "";
  $("system-prompt").value = saved.systemPrompt ?? "";
  state.plugins = new Set(saved.plugins ?? []);
}

function saveSettings() {
  // Until the server's plugins are listed, the saved choice stands.
  if (state.pluginsListed) {
    state.plugins = new Set([...document.querySelectorAll("#plugins input:checked")].map((box) => box.value));
  }
  const plugins = [...state.plugins];
  const settings = { temperature: $("temperature").value, systemPrompt: $("system-prompt").value, plugins };
  localStorage.setItem(SETTINGS, JSON.stringify(settings));
}

/** The server's ready plugins, each a box: checked ones the model may call. */
async function loadPlugins() {
  let list;
  try {
    list = await api("GET", "/api/plugins");
  } catch {
    return; // the conversation list reports what is wrong (a missing key)
  }
  const boxes = list.data
    .filter((p) => p.state === "ready")
    .map((p) => {
      const label = document.createElement("label");
      label.className = "plugin";
      label.title = p.description || "";
      const box = document.createElement("input");
      box.type = "checkbox";
      box.value = p.name;
      box.checked = state.plugins.has(p.name);
      box.addEventListener("change", saveSettings);
      label.append(box, ` ${p.name}`);
      return label;
    });
  $("plugins").replaceChildren(...boxes);
  // A plugin chosen before and gone (or disabled) now is no longer sent: the server would refuse every message.
  state.pluginsListed = true;
  saveSettings();
}

$("temperature").addEventListener("change", saveSettings);
$("system-prompt").addEventListener("change", saveSettings);

// --- Conversations ------------------------------------------------------------------------------------------

async function loadConversations() {
  let list;
  try {
    list = await api("GET", "/api/sessions?limit=100");
  } catch (error) {
    report(error);
    return;
  }
  $("conversations").replaceChildren(...list.sessions.map(conversationItem));
}

function conversationItem(session) {
  const item = document.createElement("div");
  item.className = "conversation";
  item.dataset.id = session.id;
  item.classList.toggle("active", session.id === state.session);

  const open = document.createElement("button");
  open.type = "button";
  open.className = "open";
  open.textContent = session.metadata?.title || "Untitled conversation";
  open.title = `${session.message_count} messages, last ${new Date(session.updated_at_ms).toLocaleString()}`;
  open.addEventListener("click", () => openConversation(session.id));

  const remove = document.createElement("button");
  remove.type = "button";
  remove.className = "delete quiet";
  remove.textContent = "×";
  remove.title = "Delete this conversation";
  remove.addEventListener("click", () => deleteConversation(session.id));

  item.append(open, remove);
  return item;
}

function markActive() {
  for (const item of document.querySelectorAll(".conversation")) {
    item.classList.toggle("active", item.dataset.id === state.session);
  }
}

async function openConversation(id) {
  if (state.controller) return; // an answer is still streaming
  try {
    const session = await api("GET", `/api/sessions/${encodeURIComponent(id)}?limit=1000`);
    state.session = session.id;
    $("messages").replaceChildren();
    const calls = new Map(); // tool call id → the call's bubble, which its result joins
    for (const m of session.messages) {
      if (m.role === "user" || (m.role === "assistant" && m.content)) addBubble(m.role, m.content, "done");
      for (const call of m.tool_calls ?? []) calls.set(call.id, addToolCall(call));
      if (m.role === "tool") showToolResult(calls.get(m.tool_call_id) ?? addToolCall({ function: { name: m.name } }), m.content);
    }
    setStatus("");
    markActive();
  } catch (error) {
    report(error);
    if (error.status === 404) loadConversations();
  }
}

async function deleteConversation(id) {
  if (!confirm("Delete this conversation?")) return;
  try {
    await api("DELETE", `/api/sessions/${encodeURIComponent(id)}`);
  } catch (error) {
    if (error.status !== 404) return report(error);
  }
  if (state.session === id) newChat();
  loadConversations();
}

function newChat() {
  if (state.controller) state.controller.abort();
  state.session = null;
  $("messages").replaceChildren();
  setStatus("");
  markActive();
  $("input").focus();
}

// --- Chat ---------------------------------------------------------------------------------------------------

function addBubble(role, text, phase) {
  const bubble = document.createElement("div");
  bubble.className = `message ${role}`;
  bubble.dataset.phase = phase; // streaming | done | stopped | failed
  setText(bubble, text);
  $("messages").append(bubble);
  bubble.scrollIntoView({ block: "end" });
  return bubble;
}

/** Sets a message's text (kept as `data-source`): a user's as text, an answer as sanitized Markdown. */
function setText(bubble, text) {
  bubble.dataset.source = text;
  if (!bubble.classList.contains("assistant")) {
    bubble.textContent = text;
    return;
  }
  // While an answer streams, it is rendered at most once a frame.
  if (bubble.dataset.pending) return;
  bubble.dataset.pending = "1";
  requestAnimationFrame(() => {
    delete bubble.dataset.pending;
    bubble.innerHTML = DOMPurify.sanitize(marked.parse(bubble.dataset.source));
  });
}

/** A tool call: the function and its arguments, and (once it is back) its result, folded. */
function addToolCall(call, before) {
  const box = document.createElement("details");
  box.className = "tool";
  const summary = document.createElement("summary");
  const name = call.function?.name || "tool";
  summary.textContent = `Called ${name}(${call.function?.arguments ?? ""})`;
  box.dataset.name = name;
  box.append(summary);
  $("messages").insertBefore(box, before ?? null);
  return box;
}

function showToolResult(box, content, failed = false) {
  const result = document.createElement("pre");
  let shown = content;
  try {
    shown = JSON.stringify(JSON.parse(content), null, 2);
  } catch {}
  result.textContent = shown;
  box.dataset.result = content;
  box.classList.toggle("failed", failed || /"code":\s*"plugin_|"code":\s*"invalid_arguments"/.test(content));
  box.append(result);
}

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
  $("input").disabled = busy;
}

/** Yields `{event, data}` for each server-sent event of `response`. */
async function* serverEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replaceAll("\r\n", "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (data.length) yield { event, data: JSON.parse(data.join("\n")) };
    }
  }
}

async function send(text) {
  setStatus("");
  setBusy(true);
  state.controller = new AbortController();
  const question = addBubble("user", text, "done");
  let answer = addBubble("assistant", "", "streaming");
  let calledTools = false;
  try {
    if (!state.session) {
      // Cut by code points, never inside a UTF-16 surrogate pair (a lone half is not valid text).
      const points = Array.from(text);
      const title = points.length > TITLE_CHARS ? `${points.slice(0, TITLE_CHARS - 1).join("")}…` : text;
      const system_prompt = $("system-prompt").value.trim();
      const session = await api("POST", "/api/sessions", { metadata: { title }, system_prompt });
      state.session = session.id;
      loadConversations();
    }
    const body = { session_id: state.session, message: text, stream: true };
    if (state.plugins.size) body.plugins = [...state.plugins];
    // Empty means the server's default; anything else the server checks (and names in a 400 when wrong).
    if ($("temperature").value !== "") body.temperature = Number($("temperature").value);
    const response = await fetch("/api/chat", {
      method: "POST",
      headers: headers(),
      body: JSON.stringify(body),
      signal: state.controller.signal,
    });
    if (!response.ok) throw await errorOf(response);
    for await (const { event, data } of serverEvents(response)) {
      if (event === "delta") {
        setText(answer, answer.dataset.source + data.text);
        answer.scrollIntoView({ block: "end" });
      } else if (event === "tool") {
        // The model called a plugin: what it wrote before stays as it was, the call and its result follow, and
        // the answer goes on below them (as the conversation shows when opened again).
        calledTools = true;
        if (answer.dataset.source) {
          answer.dataset.phase = "done";
          const call = addToolCall(data.tool_call);
          showToolResult(call, data.content, data.failed);
          answer = addBubble("assistant", "", "streaming");
        } else {
          showToolResult(addToolCall(data.tool_call, answer), data.content, data.failed);
        }
      } else if (event === "done") {
        setText(answer, data.message.content);
        answer.dataset.phase = "done";
        answer.dataset.finishReason = data.finish_reason;
        if (data.finish_reason === "length") setStatus("The answer reached the length limit.");
      } else if (event === "error") {
        throw new ApiError(data.error?.code, data.error?.message || "the answer failed");
      }
    }
    if (answer.dataset.phase === "streaming") throw new ApiError(0, "the connection closed before the answer ended");
  } catch (error) {
    const stopped = error.name === "AbortError";
    answer.dataset.phase = stopped ? "stopped" : "failed";
    // An answer that ends before its first word is not kept by the server either: take the question back.
    if (!answer.dataset.source && !calledTools) {
      question.remove();
      answer.remove();
      $("input").value = text;
    }
    if (!stopped) report(error);
  } finally {
    state.controller = null;
    setBusy(false);
    $("input").focus();
    loadConversations();
  }
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("input").value.trim();
  if (!text || state.controller) return;
  $("input").value = "";
  send(text);
});
$("input").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", () => state.controller?.abort());
$("new-chat").addEventListener("click", newChat);

restoreSettings();
loadConversations();
loadPlugins();
$("input").focus();
