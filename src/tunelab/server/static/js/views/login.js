import { h, icon, field, setFieldError, button } from "../dom.js";
import { get, auth, ApiError } from "../api.js";

export async function render(root, { query }, ctx) {
  ctx.setHeader("Sign in");
  const next = query.get("next") || "data";
  if (ctx.info && ctx.info.auth === false) { ctx.navigate(next); return; }
  const reason = sessionStorage.getItem("tunelab.loginReason");
  sessionStorage.removeItem("tunelab.loginReason");

  const input = h("input", { type: "password", id: "api-key", name: "api-key", autocomplete: "off",
                             spellcheck: "false", placeholder: "tl-…", required: true });
  const submit = button("Sign in", { kind: "primary wide", type: "submit", icon: "key" });
  const form = h("form", { class: "login-form", novalidate: true },
    field("API key", input, { hint: "Create one on the server with: tunelab keys create NAME", error: reason }),
    submit);
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const key = input.value.trim();
    if (!key) { setFieldError(form, "api-key", "Enter the API key that `tunelab keys create` printed."); input.focus(); return; }
    submit.disabled = true;
    auth.set(key);
    try {
      await get("/v1/models", { quiet401: true });
      ctx.navigate(next === "login" ? "data" : next);
    } catch (err) {
      auth.clear();
      const msg = err instanceof ApiError && err.status === 401
        ? `This API key was refused by the server (401${err.message ? ": " + err.message.replace(/\.$/, "") : ""}).`
        : err.message;
      setFieldError(form, "api-key", msg);
      input.focus();
      input.select();
    } finally { submit.disabled = false; }
  });

  root.append(h("div", { class: "login" },
    h("div", { class: "login-card card" },
      h("div", { class: "login-brand" }, h("span", { class: "logo big", "aria-hidden": "true" }, icon("spark", 26)), h("span", {}, "tunelab")),
      h("p", { class: "login-lead" }, "Fine-tune open language models on your own data, watch them train, and compare them with the base model."),
      form,
      h("p", { class: "muted small" }, "The key is kept in this browser tab only (session storage) and sent as a Bearer token."))));
  input.focus();
}
