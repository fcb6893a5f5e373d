// The page's only back end: tunelab's HTTP API (OpenAI shapes + /v1/tunelab extensions).
// Every failure becomes an ApiError whose message is meant for the user, in words.

const KEY = "tunelab.apiKey";

export class ApiError extends Error {
  constructor(message, { status = 0, type = null, param = null, code = null, network = false } = {}) {
    super(message);
    Object.assign(this, { status, type, param, code, network });
  }
}

export const auth = {
  get key() { return sessionStorage.getItem(KEY) || ""; },
  set(key) { sessionStorage.setItem(KEY, key); },
  clear() { sessionStorage.removeItem(KEY); },
};

function headers(extra = {}) {
  const hd = { ...extra };
  if (auth.key) hd.Authorization = `Bearer ${auth.key}`;
  return hd;
}

// FastAPI's own 422 body is {"detail": [...]}; the contract's is {"error": {...}}. Read both.
async function errorFrom(res) {
  let body = null;
  const text = await res.text().catch(() => "");
  try { body = JSON.parse(text); } catch { /* not JSON */ }
  const e = body && body.error;
  if (e && typeof e === "object") {
    return new ApiError(e.message || res.statusText, { status: res.status, type: e.type, param: e.param, code: e.code });
  }
  if (body && body.detail) {
    const d = Array.isArray(body.detail) ? body.detail[0] : body.detail;
    const loc = d && d.loc ? d.loc.filter((p) => p !== "body").join(".") : null;
    const msg = typeof d === "string" ? d : `${loc ? loc + ": " : ""}${d.msg || JSON.stringify(d)}`;
    return new ApiError(msg, { status: res.status, param: loc });
  }
  const fallback = res.status === 401 ? "This API key was not accepted." :
                   res.status === 404 ? "Not found." :
                   res.status >= 500 ? "The server failed to answer this request." : res.statusText;
  return new ApiError(text && text.length < 300 && !text.startsWith("<") ? text : `${fallback}`, { status: res.status });
}

const NETWORK = "Cannot reach the tunelab server. Check that `tunelab serve` is still running; the page retries by itself.";

export async function request(path, { method = "GET", body, form, signal, raw = false, quiet401 = false } = {}) {
  let res;
  const opts = { method, signal, headers: headers() };
  if (form) opts.body = form;
  else if (body !== undefined) {
    opts.body = JSON.stringify(body);
    opts.headers["Content-Type"] = "application/json";
  }
  try {
    res = await fetch(path, opts);
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiError(NETWORK, { network: true });
  }
  if (!res.ok) {
    const err = await errorFrom(res);
    if (res.status === 401 && !quiet401) window.dispatchEvent(new CustomEvent("tunelab:unauthorized", { detail: err }));
    throw err;
  }
  if (raw) return res;
  if (res.status === 204) return null;
  const type = res.headers.get("content-type") || "";
  return type.includes("json") ? res.json() : res.text();
}

export const get = (path, o) => request(path, o);
export const post = (path, body, o = {}) => request(path, { ...o, method: "POST", body });
export const del = (path, o = {}) => request(path, { ...o, method: "DELETE" });

// All pages of an OpenAI list endpoint (data / has_more / after=<last id>), up to `max` items.
export async function listAll(path, { max = 500, limit = 100 } = {}) {
  const out = [];
  let after = null;
  for (;;) {
    const sep = path.includes("?") ? "&" : "?";
    const page = await get(`${path}${sep}limit=${limit}${after ? "&after=" + encodeURIComponent(after) : ""}`);
    const data = (page && page.data) || [];
    out.push(...data);
    if (!page.has_more || !data.length || out.length >= max) return out;
    after = page.last_id || data[data.length - 1].id;
  }
}

// Upload with XMLHttpRequest: fetch cannot report upload progress.
export function upload(file, { purpose = "fine-tune", onProgress } = {}) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", "/v1/files");
    if (auth.key) xhr.setRequestHeader("Authorization", `Bearer ${auth.key}`);
    xhr.upload.onprogress = (e) => e.lengthComputable && onProgress && onProgress(e.loaded / e.total);
    xhr.onerror = () => reject(new ApiError(NETWORK, { network: true }));
    xhr.onload = async () => {
      const res = new Response(xhr.responseText, { status: xhr.status, statusText: xhr.statusText });
      if (xhr.status >= 200 && xhr.status < 300) resolve(JSON.parse(xhr.responseText));
      else {
        const err = await errorFrom(res);
        if (xhr.status === 401) window.dispatchEvent(new CustomEvent("tunelab:unauthorized", { detail: err }));
        reject(err);
      }
    };
    const form = new FormData();
    form.append("purpose", purpose);
    form.append("file", file, file.name);
    xhr.send(form);
  });
}

// POST /v1/chat/completions with stream: true, read as server-sent events through
// fetch + ReadableStream (EventSource cannot POST or send an Authorization header).
export async function streamChat(body, { signal, onDelta, onChunk } = {}) {
  const send = (b) => request("/v1/chat/completions", { method: "POST", body: b, signal, raw: true });
  let res;
  try {
    res = await send({ ...body, stream: true, stream_options: { include_usage: true } });
  } catch (e) {
    // A server without OpenAI's stream_options: ask again without it.
    if (e instanceof ApiError && e.status === 400 && String(e.param || "").startsWith("stream_options")) {
      res = await send({ ...body, stream: true });
    } else throw e;
  }
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buf = "", usage = null, finish = null;
  for (;;) {
    let r;
    try { r = await reader.read(); } catch (e) {
      if (e.name === "AbortError") throw e;
      throw new ApiError("The connection dropped while the answer was streaming.", { network: true });
    }
    if (r.done) break;
    buf += decoder.decode(r.value, { stream: true });
    let i;
    while ((i = buf.search(/\r?\n/)) >= 0) {
      const line = buf.slice(0, i);
      buf = buf.slice(buf[i] === "\r" ? i + 2 : i + 1);
      if (!line.startsWith("data:")) continue;
      const data = line.slice(5).trim();
      if (data === "[DONE]") return { usage, finish };
      let chunk;
      try { chunk = JSON.parse(data); } catch { continue; }
      if (chunk.error) throw new ApiError(chunk.error.message || "generation failed", chunk.error);
      if (chunk.usage) usage = chunk.usage;
      const choice = chunk.choices && chunk.choices[0];
      if (choice) {
        const text = choice.delta && choice.delta.content;
        if (text) onDelta && onDelta(text);
        if (choice.finish_reason) finish = choice.finish_reason;
      }
      onChunk && onChunk(chunk);
    }
  }
  return { usage, finish };
}

// Fetch a file with the key and hand it to the browser as a download.
export async function download(path, name) {
  const res = await request(path, { raw: true });
  const blob = await res.blob();
  const url = URL.createObjectURL(blob);
  const a = Object.assign(document.createElement("a"), { href: url, download: name || "download" });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 5000);
}
