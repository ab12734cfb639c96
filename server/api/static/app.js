// The playground: calls the public API like any client (no private endpoints), sends the API
// key the operator types, and shows streamed answers, usage, frame captions, categories and
// async jobs. Plain JS, no build step and nothing from the network but this server.
"use strict";

const $ = (id) => document.getElementById(id);
const media = []; // {kind: "image" | "video", url, name}
const JOB_POLL_MS = 500;
const JOB_RETRIES = 60; // status checks that may fail in a row (a restart) before giving up
let stopping = null; // the running request's AbortController (Stop)
const CATEGORIES = ["categories", "participants", "actions", "scene", "tags"];

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

async function api(method, path, body, signal) {
  let response;
  try {
    response = await fetch(path, {
      method,
      headers: headers(),
      body: body === undefined ? undefined : JSON.stringify(body),
      signal,
    });
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new Error("Cannot reach the server (is it running?)");
  }
  if (!response.ok) throw new Error(await errorText(response));
  return response;
}

async function errorText(response) {
  try {
    const { error } = await response.json();
    return `${response.status} ${error.code || error.type}: ${error.message}`;
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

function showError(err) {
  $("error").textContent = err ? String(err.message || err) : "";
  $("error").hidden = !err;
}

async function loadModels() {
  try {
    const response = await fetch("v1/models", { headers: headers() });
    if (response.status === 401 && !$("api-key").value.trim()) {
      showError("This server needs an API key: enter it above.");
      return;
    }
    if (!response.ok) throw new Error(await errorText(response));
    const { data } = await response.json();
    $("model").replaceChildren(...data.map((m) => new Option(m.id, m.id)));
    showError(null);
  } catch (err) {
    showError(err.name === "TypeError" ? "Cannot reach the server (is it running?)" : err);
  }
}

// The model list before a request: typed a key and pressed Ask at once (no change event yet).
async function ensureModel() {
  if (!$("model").value) await loadModels();
  if (!$("model").value) throw new Error($("error").textContent || "No model to ask.");
}

// -- media -----------------------------------------------------------------------------------

// "image" or "video": the choice next to the URL, else the file's or data URI's type, else
// the URL's extension.
function kindOf(type, url, chosen) {
  if (chosen === "image" || chosen === "video") return chosen;
  const dataType = /^data:([^;,]+)/i.exec(url);
  if (!type && dataType) type = dataType[1].toLowerCase();
  if (type) return type.startsWith("video/") ? "video" : "image";
  return /\.(mp4|m4v|mov|webm|mkv|avi)(\?|#|$)/i.test(url) ? "video" : "image";
}

function addMedia(item) {
  media.push(item);
  renderMedia();
}

function renderMedia() {
  $("media").replaceChildren(
    ...media.map((item, index) => {
      const li = document.createElement("li");
      const preview = document.createElement(item.kind === "video" ? "video" : "img");
      preview.src = item.url;
      const name = document.createElement("span");
      name.textContent = item.name;
      const remove = document.createElement("button");
      remove.className = "remove";
      remove.textContent = "×";
      remove.title = "remove";
      remove.onclick = () => {
        media.splice(index, 1);
        renderMedia();
      };
      li.append(preview, name, remove);
      return li;
    }),
  );
}

function readAsDataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function addFiles(files) {
  for (const file of files) {
    addMedia({ kind: kindOf(file.type, file.name), url: await readAsDataUrl(file), name: file.name });
  }
}

// -- requests --------------------------------------------------------------------------------

function messages() {
  const parts = media.map((item) =>
    item.kind === "video"
      ? { type: "video_url", video_url: { url: item.url } }
      : { type: "image_url", image_url: { url: item.url } },
  );
  parts.push({ type: "text", text: $("question").value });
  return [{ role: "user", content: parts }];
}

// A number field's value, or undefined when it is empty (the server's default then).
function numberOf(id) {
  const text = $(id).value.trim();
  return text === "" ? undefined : Number(text);
}

function completionBody(extra) {
  const body = {
    model: $("model").value,
    messages: messages(),
    max_tokens: numberOf("max-tokens"),
    temperature: numberOf("temperature"),
    ...extra,
  };
  if ($("video-mode").value) body.video_mode = $("video-mode").value;
  if ($("use-scenes").checked) body.use_scenes = true;
  return body;
}

function clearResult() {
  showError(null);
  $("answer").textContent = "";
  $("usage").textContent = "";
  $("frames").hidden = true;
  $("categories-result").hidden = true;
  $("job-box").hidden = true;
}

function showUsage(usage) {
  if (!usage) return;
  const details = usage.prompt_tokens_details || {};
  const extra = ["image_tokens", "video_tokens", "cached_tokens"]
    .filter((k) => details[k])
    .map((k) => `${details[k]} ${k.replace("_tokens", "")}`);
  $("usage").textContent =
    `usage: ${usage.prompt_tokens} prompt` +
    (extra.length ? ` (${extra.join(", ")})` : "") +
    ` + ${usage.completion_tokens} completion = ${usage.total_tokens} tokens`;
}

function showFrames(frames) {
  if (!frames || !frames.length) return;
  $("frames").tBodies[0].replaceChildren(
    ...frames.map((frame) => {
      const row = document.createElement("tr");
      const time = document.createElement("td");
      time.textContent = `${frame.timestamp.toFixed(2)} s`;
      const text = document.createElement("td");
      text.textContent = frame.caption ?? JSON.stringify(frame.result);
      row.append(time, text);
      return row;
    }),
  );
  $("frames").hidden = false;
}

// Server-sent events: "data: {json}" blocks separated by blank lines, then "data: [DONE]".
async function* events(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        if (line === "data: [DONE]") return;
        yield JSON.parse(line.slice(6));
      }
    }
  }
}

async function ask(signal) {
  const endpoint = $("endpoint").value;
  const body = completionBody({ stream: true, stream_options: { include_usage: true } });
  const response = await api("POST", endpoint, body, signal);
  let finish = null;
  try {
    for await (const chunk of events(response)) {
      if (chunk.error) throw new Error(chunk.error.message);
      showFrames(chunk.frames);
      const choice = chunk.choices && chunk.choices[0];
      if (choice && choice.delta && choice.delta.content) {
        $("answer").textContent += choice.delta.content;
      }
      if (choice && choice.finish_reason) finish = choice.finish_reason;
      showUsage(chunk.usage);
    }
  } catch (err) {
    // (a network failure mid-stream is a TypeError; the stream's own error event is not)
    if (err.name === "TypeError") throw new Error("The connection to the server was lost.");
    throw err;
  }
  if (finish === "length") $("usage").textContent += " (stopped at max tokens)";
}

async function categories(signal) {
  if (!media.length) throw new Error("Add an image or a video first.");
  const body = { model: $("model").value, media_url: media[0].url, metadata: CATEGORIES };
  if ($("use-scenes").checked) body.use_scenes = true;
  const result = await (await api("POST", "v2/media/categories", body, signal)).json();
  showCategories(result);
}

function showCategories(result) {
  $("categories-result").textContent = JSON.stringify(result.result, null, 2);
  $("categories-result").hidden = false;
  showFrames(result.frames);
  showUsage(result.usage);
}

async function job(signal) {
  const body = completionBody({ async: true });
  const status = await (await api("POST", "v2/media/completions", body, signal)).json();
  sessionStorage.setItem("vlm-job", status.id); // a reload follows it on
  await follow(status, signal);
}

// Polls a job until it ends; a failed check (the server restarting) is tried again.
async function follow(status, signal) {
  $("job-box").hidden = false;
  let failures = 0;
  while (showJob(status)) {
    await new Promise((resolve) => setTimeout(resolve, JOB_POLL_MS * (1 + failures)));
    if (signal && signal.aborted) return; // Stop: the job goes on; its id is shown
    try {
      status = await (await api("GET", `v2/media/status/${status.id}`)).json();
      failures = 0;
    } catch (err) {
      if (++failures > JOB_RETRIES) throw err;
      $("job-status").textContent = `${status.id}: ${err.message}; trying again…`;
    }
  }
  sessionStorage.removeItem("vlm-job");
}

// Shows a job's state; true while it is still running.
function showJob(status) {
  $("job-progress").value = status.progress;
  $("job-status").textContent = `${status.id}: ${status.status} ${Math.round(status.progress * 100)}%`;
  if (status.status === "completed") {
    const result = status.result;
    if (result.object === "media.categories") showCategories(result);
    else $("answer").textContent = result.choices[0].message.content;
    showFrames(result.frames);
    showUsage(result.usage);
  } else if (status.status === "failed" || status.status === "cancelled") {
    showError(status.error ? status.error.message : status.status);
  }
  return status.status === "queued" || status.status === "processing";
}

// Runs one action at a time; Stop aborts it (what arrived stays on the page).
function run(action) {
  return async () => {
    if (stopping) return;
    const buttons = document.querySelectorAll(".buttons button:not(#stop)");
    buttons.forEach((b) => (b.disabled = true));
    stopping = new AbortController();
    $("stop").hidden = false;
    clearResult();
    try {
      await ensureModel();
      await action(stopping.signal);
    } catch (err) {
      showError(err.name === "AbortError" ? "Stopped." : err);
    } finally {
      stopping = null;
      $("stop").hidden = true;
      buttons.forEach((b) => (b.disabled = false));
    }
  };
}

document.addEventListener("DOMContentLoaded", () => {
  $("api-key").value = sessionStorage.getItem("vlm-api-key") || "";
  $("api-key").addEventListener("change", () => {
    sessionStorage.setItem("vlm-api-key", $("api-key").value);
    loadModels();
  });
  $("files").addEventListener("change", (e) => {
    addFiles(e.target.files).catch(showError);
    e.target.value = ""; // the same file may be chosen again after removing it
  });
  $("url-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const url = $("url").value.trim();
    if (url) addMedia({ kind: kindOf("", url, $("url-kind").value), url, name: url });
    $("url").value = "";
  });
  $("ask").addEventListener("click", run(ask));
  $("categories").addEventListener("click", run(categories));
  $("job").addEventListener("click", run(job));
  $("stop").addEventListener("click", () => stopping && stopping.abort());
  $("question").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
      e.preventDefault();
      $("ask").click();
    }
  });
  loadModels();
  fetch("version")
    .then((r) => r.json())
    .then((v) => ($("version").textContent = v.version))
    .catch(() => {});
  const pending = sessionStorage.getItem("vlm-job"); // a job followed before a reload
  if (pending) run((signal) => follow({ id: pending, status: "queued", progress: 0 }, signal))();
});
