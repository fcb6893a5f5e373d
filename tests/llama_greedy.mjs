// Greedy continuations from llama.cpp (node-llama-cpp 3.21.1's prebuilt CPU binaries).
// request (argv[2] or stdin, JSON): {"model": PATH, "lora": PATH|null, "texts": [str],
//   "prompts": [[id]], "max_tokens": N}
// stdout: {"tokenized": [[id]] (llama.cpp's ids for each text, special tokens parsed),
//          "outputs": [[id]] (up to N greedy ids after each prompt; an end-of-generation token
//          ends one early and is not included), "seconds": s, "generated": k,
//          "tokens_per_second": k/s, "chat_template": str|null}
import {readFileSync} from "node:fs";
import {fileURLToPath} from "node:url";
import path from "node:path";

const here = path.dirname(fileURLToPath(import.meta.url));
const lib = process.env.NODE_LLAMA_CPP ||
  path.join(here, "..", ".llama", "node_modules", "node-llama-cpp", "dist", "index.js");
const {getLlama} = await import(lib);
const req = JSON.parse(process.argv[2] ?? readFileSync(0, "utf8"));
const n = req.max_tokens ?? req.n ?? 0;
const llama = await getLlama({gpu: false, build: "never", logLevel: "error"});
const model = await llama.loadModel({modelPath: req.model});
const ctxOpts = {contextSize: req.context || 512, sequences: 1, threads: req.threads || 2};
if (req.lora) ctxOpts.lora = {adapters: [{filePath: req.lora}]};
const context = await model.createContext(ctxOpts);
const seq = context.getSequence();
const tokenized = (req.texts || []).map(t => Array.from(model.tokenize(t, true)));
const outputs = [];
let generated = 0;
const t0 = performance.now();
for (const prompt of req.prompts || []) {
  await seq.clearHistory();
  const out = [];
  if (n > 0) {
    for await (const tok of seq.evaluate(prompt, {temperature: 0})) {
      if (model.isEogToken(tok)) break;
      out.push(tok);
      if (out.length >= n) break;
    }
  }
  generated += out.length;
  outputs.push(out);
}
const seconds = (performance.now() - t0) / 1000;
const chat_template = model.fileInfo?.metadata?.tokenizer?.chat_template ?? null;
process.stdout.write(JSON.stringify({tokenized, outputs, seconds, generated,
  tokens_per_second: seconds > 0 ? generated / seconds : null, chat_template}) + "\n");
process.exit(0);
