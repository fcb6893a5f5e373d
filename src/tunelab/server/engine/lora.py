"""Many LoRA adapters applied to one mixed batch with a few dense matmuls per layer.

PEFT can mix adapters in a batch (`adapter_names=`), but it does so by looping over the adapters
present in every LoRA layer: with 8 adapters in a decode batch of 8 rows that is 8 small
matmul pairs, plus the row selection, in each of SmolLM2's 210 linear layers, and
`bench/serve.py` measured 8 clients on 8 adapters at x0.35 the base's tokens/s. Here the
resident adapters of a base sit side by side in each layer: A as one (slots x rank, in) matrix
and B as one (out, slots x rank) matrix. A step computes x @ A for every slot at once, zeroes
each row's columns but its own adapter's (a mask made once per step), and adds that @ B: a
few ops per layer whatever the mix (a gather of each row's A and B, S-LoRA's and Punica's way,
measured slower here in plain torch: on CPU the per-op cost dominates at these sizes). On CPU
the products run in fp32 (see LoraBank.math_dtype). Ranks differ between adapters: each is zero-padded to the largest
rank resident, which leaves its product unchanged. The cost grows with the slots allocated
(the most adapters resident at once), not with the adapters on disk.

Only plain LoRA on nn.Linear layers comes here (adapters.mixable); the rest is merged into a
model of its own.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

_PREFIX = "base_model.model."


class LoraBank:
    def __init__(self, model, device, dtype):
        self.model = model
        self.device, self.dtype = device, dtype
        self.rank = 0                               # the stacks' rank: the largest resident
        self.slots: dict[str, int] = {}             # adapter name -> its slot
        self.layers: dict[str, _Layer] = {}         # module name -> its stacks
        self._free: list[int] = []
        self._size = 0                              # slots allocated
        self._mask = None                           # this forward's (rows, 1, slots x rank)
        self._masks: dict[int, Any] = {}            # ... per input length (mask())

    # ---- adapters in and out ----------------------------------------------------------------

    def add(self, name: str, adapter_dir: str) -> None:
        import torch
        from safetensors.torch import load_file
        folder = Path(adapter_dir)
        cfg = json.loads((folder / "adapter_config.json").read_text())
        weights = load_file(str(folder / "adapter_model.safetensors"))
        pairs: dict[str, dict[str, Any]] = {}
        for key, w in weights.items():
            module, kind = _split(key)
            pairs.setdefault(module, {})[kind] = w
        modules = dict(self.model.named_modules())
        rank = max(p["A"].shape[0] for p in pairs.values())
        for module, p in pairs.items():
            if not isinstance(modules.get(module), torch.nn.Linear) or set(p) != {"A", "B"}:
                raise ValueError(f"adapter {adapter_dir}: {module} is not a LoRA pair on a "
                                 "linear layer of its base")
        slot = min(self._free) if self._free else self._grow_slots()
        if slot in self._free:
            self._free.remove(slot)
        if rank > self.rank:
            for layer in self.layers.values():
                layer.pad_rank(rank)
            self.rank = rank
        alpha, r = cfg.get("lora_alpha", cfg["r"]), cfg["r"]
        scale = alpha / (r ** 0.5 if cfg.get("use_rslora") else r)
        with torch.no_grad():
            for module, p in pairs.items():
                layer = self.layers.get(module)
                if layer is None:
                    layer = self.layers[module] = _Layer(self, modules[module])
                layer.put(slot, p["A"], p["B"] * scale)
            for module, layer in self.layers.items():
                if module not in pairs:
                    layer.clear(slot)
            self._pack()
        self.slots[name] = slot

    def remove(self, name: str) -> None:
        slot = self.slots.pop(name)
        with torch_no_grad():
            for layer in self.layers.values():
                layer.clear(slot)
            self._pack()
        self._free.append(slot)

    def _pack(self) -> None:
        for layer in self.layers.values():
            layer.pack()

    def _grow_slots(self) -> int:
        """One more slot in every stack; returns its index."""
        slot = self._size
        self._size += 1
        for layer in self.layers.values():
            layer.grow(self._size)
        return slot

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers.values())

    # ---- a forward over a mixed batch -------------------------------------------------------

    @contextlib.contextmanager
    def rows(self, names: list[str]):
        """Within: the batch's row i uses adapter names[i] (BASE_ADAPTER: none)."""
        import torch
        slots = [self.slots.get(n) for n in names]
        if any(s is not None for s in slots):
            r = self.rank
            mask = torch.zeros(len(names), 1, self._size * r, dtype=self.math_dtype)
            for i, s in enumerate(slots):
                if s is not None:
                    mask[i, 0, s * r:(s + 1) * r] = 1
            self._mask = mask.to(self.device)
        try:
            yield
        finally:
            self._mask = None
            self._masks.clear()

    def mask(self, tokens: int):
        """This forward's mask for inputs of `tokens` positions per row, one line per
        position: (rows x tokens, slots x rank)."""
        m = self._masks.get(tokens)
        if m is None:
            m = self._masks[tokens] = self._mask.expand(-1, tokens, -1).reshape(
                -1, self._mask.shape[-1])
        return m

    @property
    def math_dtype(self):
        """The LoRA products' dtype: fp32 on CPU, where these skinny bf16 matmuls cost ~20 us
        each whatever the work (oneDNN) and fp32 ones (MKL) half that, and the sums are
        exact; the model's own on a GPU."""
        import torch
        return torch.float32 if self.device.type == "cpu" else self.dtype


class _Layer:
    """One linear layer's adapters: A (slots, rank, in) and B (slots, out, rank), the scale
    folded into B."""

    def __init__(self, bank: LoraBank, linear):
        import torch
        self.bank = bank
        kw = dict(device=bank.device, dtype=bank.math_dtype)
        self.A = torch.zeros(bank._size, bank.rank, linear.in_features, **kw)
        self.B = torch.zeros(bank._size, linear.out_features, bank.rank, **kw)
        self._a = self._b = None
        inner = linear.forward                # plain, or prepacked (weights.prepack_linears)
        mm = torch.mm

        def forward(x):
            out = inner(x)
            if bank._mask is None:
                return out
            h = mm(x.reshape(-1, x.shape[-1]).to(self._a.dtype), self._a)
            h.mul_(bank.mask(x.shape[1]))
            return out.add_(mm(h, self._b).view(out.shape))
        linear.forward = forward              # nn.Module.__call__ calls self.forward

    def put(self, slot: int, A, B) -> None:
        r = A.shape[0]
        self.A[slot].zero_()
        self.B[slot].zero_()
        self.A[slot, :r] = A.to(self.A.dtype)
        self.B[slot, :, :r] = B.to(self.B.dtype)

    def clear(self, slot: int) -> None:
        self.A[slot].zero_()
        self.B[slot].zero_()

    def grow(self, size: int) -> None:
        import torch
        self.A = torch.cat([self.A, self.A.new_zeros(size - len(self.A), *self.A.shape[1:])])
        self.B = torch.cat([self.B, self.B.new_zeros(size - len(self.B), *self.B.shape[1:])])

    def pad_rank(self, rank: int) -> None:
        import torch.nn.functional as F
        extra = rank - self.A.shape[1]
        self.A = F.pad(self.A, (0, 0, 0, extra))
        self.B = F.pad(self.B, (0, extra))

    def pack(self) -> None:
        """The forward's matrices, after adapters came or went: x @ a (in, slots x rank),
        then @ b (slots x rank, out)."""
        slots, out, rank = self.B.shape
        self._a = self.A.reshape(slots * rank, -1).t().contiguous()
        self._b = self.B.permute(0, 2, 1).reshape(slots * rank, out).contiguous()

    @property
    def nbytes(self) -> int:
        return 2 * sum(t.numel() * t.element_size() for t in (self.A, self.B))


def torch_no_grad():
    import torch
    return torch.no_grad()


def _split(key: str) -> tuple[str, str]:
    """'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight' ->
    ('model.layers.0.self_attn.q_proj', 'A')."""
    key = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
    for kind in ("A", "B"):
        marker = f".lora_{kind}.weight"
        if key.endswith(marker):
            return key[:-len(marker)], kind
    raise ValueError(f"not a LoRA weight: {key}")
