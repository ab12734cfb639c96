// The playground: calls the public API like any client (no private endpoints), sends the API
// key the operator types, and shows streamed answers, usage, frame captions, categories and
// async jobs. Plain JS, no build step and nothing from the network but this server.
"use strict";

const $ = (id) => document.getElementById(id);
const media = []; // {kind: "image" | "video", url, name}
const JOB_POLL_MS = 500;
const CATEGORIES = ["categories", "participants", "actions", "scene", "tags"];

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

async function api(method, path, body) {
  const response = await fetch(path, {
    method,
    headers: headers(),
    body: body === undefined ? undefined : JSON.stringify(body),
  });
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
    const { data } = await (await api("GET", "/v1/models")).json();
    $("model").replaceChildren(...data.map((m) => new Option(m.id, m.id)));
    showError(null);
  } catch (err) {
    showError(err);
  }
  fetch("/version").then((r) => r.json()).then((v) => ($("version").textContent = v.version));
}

// -- media -----------------------------------------------------------------------------------

function kindOf(type, url) {
  if (type) return type.startsWith("video/") ? "video" : "image";
  return /\.(mp4|m4v|mov|webm|mkv|avi)(\?|$)/i.test(url) ? "video" : "image";
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

function completionBody(extra) {
  const body = {
    model: $("model").value,
    messages: messages(),
    max_tokens: Number($("max-tokens").value),
    temperature: Number($("temperature").value),
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

async function ask() {
  const endpoint = $("endpoint").value;
  const body = completionBody({ stream: true, stream_options: { include_usage: true } });
  const response = await api("POST", endpoint, body);
  for await (const chunk of events(response)) {
    if (chunk.error) throw new Error(chunk.error.message);
    showFrames(chunk.frames);
    const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
    if (delta && delta.content) $("answer").textContent += delta.content;
    showUsage(chunk.usage);
  }
}

async function categories() {
  if (!media.length) throw new Error("Add an image or a video first.");
  const body = { model: $("model").value, media_url: media[0].url, metadata: CATEGORIES };
  if ($("use-scenes").checked) body.use_scenes = true;
  const result = await (await api("POST", "/v2/media/categories", body)).json();
  showCategories(result);
}

function showCategories(result) {
  $("categories-result").textContent = JSON.stringify(result.result, null, 2);
  $("categories-result").hidden = false;
  showFrames(result.frames);
  showUsage(result.usage);
}

async function job() {
  const body = completionBody({ async: true });
  let status = await (await api("POST", "/v2/media/completions", body)).json();
  $("job-box").hidden = false;
  while (showJob(status)) {
    await new Promise((resolve) => setTimeout(resolve, JOB_POLL_MS));
    status = await (await api("GET", `/v2/media/status/${status.id}`)).json();
  }
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

function run(action) {
  return async () => {
    const buttons = document.querySelectorAll(".buttons button");
    buttons.forEach((b) => (b.disabled = true));
    clearResult();
    try {
      await action();
    } catch (err) {
      showError(err);
    } finally {
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
  $("files").addEventListener("change", (e) => addFiles(e.target.files).catch(showError));
  $("url-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const url = $("url").value.trim();
    if (url) addMedia({ kind: kindOf("", url), url, name: url });
    $("url").value = "";
  });
  $("ask").addEventListener("click", run(ask));
  $("categories").addEventListener("click", run(categories));
  $("job").addEventListener("click", run(job));
  loadModels();
});
