// Chat playground: two models side by side on the same prompt, answers streamed.

import { h, icon, fmtInt, fmtNum, errorBox, field, button, spinner, clear } from "../dom.js";
import { get, streamChat } from "../api.js";

export async function render(root, { query }, ctx) {
  ctx.setHeader("Chat", { sub: "The same prompt to two models at once: base on the left, fine-tuned on the right." });
  root.append(h("div", { class: "loading" }, spinner(), "Loading models…"));
  let models;
  try { models = (await get("/v1/models")).data || []; } catch (e) {
    root.replaceChildren(errorBox(e, { title: "Could not list models:" }));
    return;
  }
  root.replaceChildren();
  const ids = models.map((m) => m.id);
  for (const q of ["left", "right"]) if (query.get(q) && !ids.includes(query.get(q))) ids.push(query.get(q));
  const created = Object.fromEntries(models.map((m) => [m.id, m.created || 0]));
  const tuned = ids.filter((m) => m.startsWith("ft:")).sort((x, y) => created[y] - created[x]);
  const baseIds = ids.filter((m) => !m.startsWith("ft:"));
  const leftDefault = query.get("left") || baseIds[0] || ids[0] || "";
  const rightDefault = query.get("right") || tuned.find((m) => !/:ckpt/.test(m)) || tuned[0] || ids[1] || "";

  const modelSelect = (id, value) => {
    const s = h("select", { id, class: "model-select" });
    const groups = [["Base models", baseIds], ["Fine-tuned", tuned.filter((m) => !/:ckpt/.test(m))], ["Checkpoints", tuned.filter((m) => /:ckpt/.test(m))]];
    s.append(h("option", { value: "" }, "— off —"));
    for (const [label, list] of groups) if (list.length) s.append(h("optgroup", { label }, list.map((m) => h("option", { value: m }, m))));
    s.value = value;
    return s;
  };

  const system = h("textarea", { id: "chat-system", rows: 1, placeholder: "Optional system message for both models" });
  const temp = h("input", { type: "number", id: "chat-temp", min: 0, max: 2, step: 0.1, value: 0, inputmode: "decimal" });
  const maxTok = h("input", { type: "number", id: "chat-max", min: 1, max: 4096, step: 1, value: 128, inputmode: "numeric" });
  const settings = h("details", { class: "chat-settings card" },
    h("summary", {}, "Settings ", h("span", { class: "muted small" }, "system message, temperature, max tokens")),
    h("div", { class: "grid-3" }, field("System message", system), field("Temperature", temp, { hint: "0 = always the most likely token (best for comparing)." }),
      field("Max tokens", maxTok, { hint: "Longest answer, in tokens." })));

  const panes = [pane("left", "A", modelSelect("chat-model-left", leftDefault)), pane("right", "B", modelSelect("chat-model-right", rightDefault))];
  const input = h("textarea", { id: "chat-input", rows: 2, placeholder: "Ask both models… (Enter to send, Shift+Enter for a new line)", "aria-label": "Prompt" });
  const send = button("Send", { kind: "primary", icon: "send", type: "submit", id: "chat-send" });
  const stop = button("Stop", { kind: "ghost", icon: "stop", id: "chat-stop", disabled: true });
  const reset = button("New chat", { kind: "ghost", icon: "refresh", id: "chat-clear" });
  const composer = h("form", { class: "composer card", novalidate: true }, input, h("div", { class: "composer-actions" }, reset, stop, send));
  root.append(settings, h("div", { class: "chat-panes" }, panes.map((p) => p.el)), composer);

  let controller = null;
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); composer.requestSubmit(); }
  });
  reset.addEventListener("click", () => { panes.forEach((p) => p.reset()); input.focus(); });
  stop.addEventListener("click", () => controller && controller.abort());
  composer.addEventListener("submit", async (e) => {
    e.preventDefault();
    const text = input.value.trim();
    if (!text || controller) return;
    const active = panes.filter((p) => p.model());
    if (!active.length) { input.setCustomValidity("Pick a model on at least one side."); input.reportValidity(); input.setCustomValidity(""); return; }
    input.value = "";
    controller = new AbortController();
    send.disabled = true; stop.disabled = false;
    const opts = { temperature: +temp.value, max_tokens: +maxTok.value || 128, system: system.value.trim() };
    await Promise.all(active.map((p) => p.ask(text, opts, controller.signal)));
    controller = null;
    send.disabled = false; stop.disabled = true;
    input.focus();
  });
  input.focus();
}

function pane(side, letter, sel) {
  const history = [];
  const log = h("div", { class: "chat-log", role: "log", "aria-live": "polite", "aria-label": `Answers of model ${letter}` });
  const empty = () => h("div", { class: "chat-empty muted" }, sel.value ? "Answers appear here." : "Pick a model to include this side.");
  log.append(empty());
  sel.setAttribute("aria-label", `Model ${letter}`);
  sel.addEventListener("change", () => { history.length = 0; clear(log, empty()); });
  const el = h("section", { class: "chat-pane card", dataset: { side } },
    h("header", { class: "pane-head" }, h("span", { class: "pane-letter", "aria-hidden": "true" }, letter), sel), log);

  async function ask(text, { temperature, max_tokens, system }, signal) {
    if (!history.length) log.replaceChildren();
    history.push({ role: "user", content: text });
    log.append(h("div", { class: "bubble user" }, text));
    const body = h("div", { class: "bubble-text" }, h("span", { class: "cursor" }));
    const meta = h("div", { class: "bubble-meta" }, spinner("Generating"));
    const bubble = h("div", { class: "bubble assistant streaming" }, body, meta);
    log.append(bubble);
    log.scrollTop = log.scrollHeight;
    const messages = [...(system ? [{ role: "system", content: system }] : []), ...history];
    let answer = "", chunks = 0, first = null;
    const t0 = performance.now();
    try {
      const { usage, finish } = await streamChat({ model: sel.value, messages, temperature, max_tokens }, {
        signal,
        onDelta: (d) => {
          if (first === null) first = performance.now();
          chunks++;
          answer += d;
          body.textContent = answer;
          body.append(h("span", { class: "cursor" }));
          if (log.scrollHeight - log.scrollTop - log.clientHeight < 80) log.scrollTop = log.scrollHeight;
        },
      });
      // A whitespace-only answer is drawn with visible marks rather than as a blank bubble.
      if (answer && !answer.trim()) body.replaceChildren(h("span", { class: "muted" }, answer.replace(/\n/g, "↵").replace(/ /g, "·")));
      else body.textContent = answer || "(empty answer)";
      history.push({ role: "assistant", content: answer });
      const secs = (performance.now() - (first ?? t0)) / 1000;
      const n = usage ? usage.completion_tokens : chunks;
      clear(meta, h("span", { class: "tokens", dataset: { tokens: n } }, `${usage ? "" : "~"}${fmtInt(n)} tokens`),
        first !== null ? ` · ${fmtNum((first - t0) / 1000, 2)} s to first token` : "",
        n > 1 && secs > 0 ? ` · ${fmtNum(n / secs, 3)} tok/s` : "",
        usage ? ` · prompt ${fmtInt(usage.prompt_tokens)}` : "",
        finish === "length" ? h("span", { class: "warn-text" }, " · cut at max tokens") : "",
        answer && !answer.trim() ? h("span", { class: "warn-text" }, " · only whitespace") : "");
    } catch (e) {
      history.pop();
      if (e.name === "AbortError") {
        body.textContent = answer || "";
        clear(meta, h("span", { class: "muted" }, "stopped"));
      } else {
        body.replaceChildren();
        if (answer) body.append(answer);
        clear(meta, errorBox(e, { title: `${sel.value}:` }));
      }
    } finally {
      bubble.classList.remove("streaming");
      log.scrollTop = log.scrollHeight;
    }
  }

  return { el, model: () => sel.value, ask, reset: () => { history.length = 0; clear(log, empty()); } };
}

