"""tunelab.attention: short bf16 rows take a matmul path instead of SDPA's flash kernel; the
model must compute the same thing either way, with padding, packed rows and left pads."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from tunelab import attention


def two_models(tiny_model_dir):
    from transformers import AutoModelForCausalLM
    ref = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    fast = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    attention.use_fast_attention(fast)
    assert ref.config._attn_implementation == "sdpa"
    assert fast.config._attn_implementation == attention.NAME
    return ref, fast


def batch(kind: str):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 400, (3, 40), generator=g)
    if kind == "right-padded":
        mask = torch.ones_like(ids)
        mask[1, 30:], mask[2, 12:] = 0, 0
        return {"input_ids": ids, "attention_mask": mask}
    if kind == "left-padded":   # generation's layout: the first rows attend to nothing
        mask = torch.ones_like(ids)
        mask[1, :10], mask[2, :25] = 0, 0
        return {"input_ids": ids, "attention_mask": mask}
    pos = torch.cat([torch.arange(15), torch.arange(20), torch.arange(5)])
    if kind == "packed":        # three examples in one row, isolated by their position ids
        return {"input_ids": ids, "position_ids": pos.expand(3, -1).contiguous()}
    if kind == "flat":          # the same, with the sequences' bounds (a flat forward)
        cu = torch.tensor([0, 15, 35, 40], dtype=torch.int32)
        return {"input_ids": ids[:1], "position_ids": pos[None], "cu_seq_lens_q": cu,
                "cu_seq_lens_k": cu, "max_length_q": 20, "max_length_k": 20}
    return {"input_ids": ids}


def three_sequences_flat(device="cpu"):
    """Three sequences (7, 30, 12 tokens), and the flat forward holding them."""
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(5, 400, (n,), generator=g).to(device) for n in (7, 30, 12)]
    cu = torch.tensor([0, 7, 37, 49], dtype=torch.int32, device=device)
    return seqs, {"input_ids": torch.cat(seqs)[None],
                  "position_ids": torch.cat([torch.arange(len(s)) for s in seqs])[None].to(device),
                  "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": 30,
                  "max_length_k": 30}


@pytest.mark.parametrize("block", [attention.QUERY_BLOCK, 16])   # 40 tokens: 1 or 3 blocks
@pytest.mark.parametrize("kind", ["causal", "right-padded", "left-padded", "packed", "flat"])
def test_the_matmul_path_computes_what_sdpa_computes(tiny_model_dir, kind, block, monkeypatch):
    """Against the model in fp32: the bf16 matmul path is no further off than bf16 SDPA."""
    from transformers import AttentionInterface
    monkeypatch.setattr(attention, "QUERY_BLOCK", block)
    ref, fast = two_models(tiny_model_dir)
    exact = copy.deepcopy(ref).float()
    calls = []

    def spy(module, query, *a, **kw):
        calls.append(query.shape[-2])
        return attention._attention(module, query, *a, **kw)

    AttentionInterface.register(attention.NAME, spy)
    try:
        b = batch(kind)
        keep = b.get("attention_mask", torch.ones_like(b["input_ids"])).bool()
        outs = []
        for model in (exact, ref, fast):
            out = model(**b, use_cache=False)
            out.logits.float().pow(2).mean(-1)[keep].sum().backward()   # pads' rows: no loss
            outs.append((out.logits.float()[keep],
                         model.model.layers[0].self_attn.q_proj.weight.grad.float()))
    finally:
        AttentionInterface.register(attention.NAME, attention._attention)
    assert calls and all(n == 40 for n in calls)          # every layer went through it
    (l32, g32), (l_sdpa, g_sdpa), (l_fast, g_fast) = outs
    assert torch.isfinite(l_fast).all() and torch.isfinite(g_fast).all()

    def off(x, y):
        return ((x - y).norm() / y.norm()).item()
    assert off(l_fast, l32) < 1.5 * off(l_sdpa, l32) + 1e-3, (off(l_fast, l32), off(l_sdpa, l32))
    assert off(g_fast, g32) < 1.5 * off(g_sdpa, g32) + 1e-3, (off(g_fast, g32), off(g_sdpa, g32))


def test_long_rows_fp32_and_decoding_stay_on_sdpa(tiny_model_dir, monkeypatch):
    from transformers.integrations import sdpa_attention
    seen = []
    real = sdpa_attention.sdpa_attention_forward
    monkeypatch.setattr(sdpa_attention, "sdpa_attention_forward",
                        lambda m, q, *a, **kw: seen.append(q.shape[-2]) or real(m, q, *a, **kw))
    _, fast = two_models(tiny_model_dir)
    with torch.no_grad():
        fast(input_ids=torch.randint(5, 400, (1, attention.SHORT_ROWS + 1)), use_cache=False)
        assert seen and set(seen) == {attention.SHORT_ROWS + 1}
        seen.clear()
        fast(input_ids=torch.randint(5, 400, (2, 20)), use_cache=False)
        assert seen == []                                   # short bf16: the matmul path
        fast.float()(input_ids=torch.randint(5, 400, (2, 20)), use_cache=False)
        assert seen and set(seen) == {20}                   # fp32: SDPA at every length
    fast.to(torch.bfloat16)
    seen.clear()    # with gradients (training) the blocks take rows up to TRAINING_ROWS
    fast(input_ids=torch.randint(5, 400, (1, attention.SHORT_ROWS + 1)), use_cache=False)
    assert seen == []
    fast(input_ids=torch.randint(5, 400, (1, attention.TRAINING_ROWS + 1)), use_cache=False)
    assert seen and set(seen) == {attention.TRAINING_ROWS + 1}


def test_a_flat_forward_keeps_each_sequence_to_itself_in_any_dtype(tiny_model_dir, monkeypatch):
    """The sequences of a flat forward go through the blocks one by one (fp32 too: the
    alternative is SDPA over the whole row's block-diagonal mask), and each sequence's logits
    are what it gets alone."""
    from transformers.integrations import sdpa_attention
    seen = []
    real = sdpa_attention.sdpa_attention_forward
    monkeypatch.setattr(sdpa_attention, "sdpa_attention_forward",
                        lambda m, q, *a, **kw: seen.append(q.shape[-2]) or real(m, q, *a, **kw))
    _, fast = two_models(tiny_model_dir)
    seqs, flat = three_sequences_flat()
    for dtype in (torch.float32, torch.bfloat16):
        fast.to(dtype)
        with torch.no_grad():
            together = fast(**flat, use_cache=False).logits[0].float()
            assert seen == []                   # every layer, every sequence: the blocks
            alone = torch.cat([fast(input_ids=s[None], use_cache=False).logits[0].float()
                               for s in seqs])
        seen.clear()
        tolerance = 1e-4 if dtype == torch.float32 else 3e-2
        assert ((together - alone).norm() / alone.norm()).item() < tolerance


def test_a_saved_model_does_not_name_the_attention(tiny_model_dir, tmp_path):
    _, fast = two_models(tiny_model_dir)
    fast.save_pretrained(tmp_path / "m")
    assert attention.NAME not in (tmp_path / "m" / "config.json").read_text()
    json.loads((tmp_path / "m" / "config.json").read_text())


@pytest.mark.parametrize("block", [attention.QUERY_BLOCK, 8])    # suffixes in 1 or 2+ blocks
def test_rows_sharing_a_prefix_in_a_flat_forward_see_it_once_and_nothing_else(tiny_model_dir,
                                                                              block, monkeypatch):
    """Two rows P+a and P+b and an unrelated row c, flat with P once (a prefix tree): each
    row's logits are what it gets alone, through the blocks only, in fp32 and bf16; and the
    loss on the trained tokens and its gradients are the padded batch's."""
    from transformers.integrations import sdpa_attention

    from tunelab.batching import flatten_rows, pad_rows, trained_token_loss
    monkeypatch.setattr(attention, "QUERY_BLOCK", block)
    seen = []
    real = sdpa_attention.sdpa_attention_forward
    monkeypatch.setattr(sdpa_attention, "sdpa_attention_forward",
                        lambda m, q, *a, **kw: seen.append(q.shape[-2]) or real(m, q, *a, **kw))
    _, fast = two_models(tiny_model_dir)
    g = torch.Generator().manual_seed(2)
    prefix = torch.randint(5, 400, (20,), generator=g).tolist()
    seqs = [prefix + torch.randint(5, 400, (n,), generator=g).tolist() for n in (11, 6)]
    seqs.append(torch.randint(5, 400, (9,), generator=g).tolist())
    rows = [{"input_ids": s, "labels": [-100] * 21 + s[21:] if k < 2 else [-100] + s[1:]}
            for k, s in enumerate(seqs)]
    flat = flatten_rows(rows, [0, 20, 0])
    assert flat["input_ids"].shape[1] == 31 + 6 + 9 and "cu_seq_lens_q" not in flat
    assert flat["position_ids"][0, 31:37].tolist() == list(range(20, 26))
    for dtype in (torch.float32, torch.bfloat16):
        fast.to(dtype)
        with torch.no_grad():
            together = fast(**{k: v for k, v in flat.items() if k != "labels"},
                            use_cache=False).logits[0].float()
            assert seen == []
            alone = [fast(input_ids=torch.tensor([s]), use_cache=False).logits[0].float()
                     for s in seqs]
        seen.clear()
        # the second row's own tokens: its logits alone past the prefix
        expected = torch.cat([alone[0], alone[1][20:], alone[2]])
        tolerance = 1e-4 if dtype == torch.float32 else 3e-2
        assert ((together - expected).norm() / expected.norm()).item() < tolerance
    fast.float()
    grads = []
    for batch in (flat, pad_rows(rows, 0)):
        fast.zero_grad()
        out = trained_token_loss(fast, batch, share_prefix=False)
        out.loss_sum.backward()
        grads.append((out.loss_sum.item(), int(out.trained),
                      fast.model.layers[0].self_attn.k_proj.weight.grad.clone()))
    (l_flat, n_flat, g_flat), (l_pad, n_pad, g_pad) = grads
    assert n_flat == n_pad == 10 + 5 + 8
    assert l_flat == pytest.approx(l_pad, rel=1e-5)
    assert ((g_flat - g_pad).norm() / g_pad.norm()).item() < 1e-4


def test_a_prefix_tree_never_falls_back_to_a_mask_that_would_hide_the_prefix(tiny_model_dir,
                                                                             monkeypatch):
    from tunelab.batching import flatten_rows
    _, fast = two_models(tiny_model_dir)
    rows = [{"input_ids": list(range(5, 45)), "labels": [-100] * 40},
            {"input_ids": list(range(5, 35)) + [7, 8], "labels": [-100] * 31 + [8]}]
    flat = flatten_rows(rows, [0, 30])
    monkeypatch.setattr(attention, "TRAINING_ROWS", 16)       # too long for the blocks now
    with pytest.raises(RuntimeError, match="shared prefixes"):
        fast(**{k: v for k, v in flat.items() if k != "labels"}, use_cache=False)


# -- on a GPU: packed sequences through PyTorch's varlen kernel ---------------------------------
# The kernel itself is CUDA-only; here a reference computes what it computes (each sequence on
# its own, causal), with either of torch's signatures, and the CPU stands in for the GPU, so the
# rest is tested everywhere: no mask built, the sequences' bounds, the layouts, GQA, gradients.

def reference_varlen(signature: str, calls: list):
    import torch.nn.functional as F

    def attend(q, k, v, cu_q, cu_k, max_q, max_k, scale=None, gqa=False):
        assert q.dim() == 3 and q.is_contiguous() and cu_q.dtype == torch.int32
        assert torch.equal(cu_q, cu_k) and int(cu_q[-1]) == q.shape[0]
        bounds = cu_q.tolist()
        assert max_q == max_k == max(b - a for a, b in zip(bounds, bounds[1:]))
        calls.append(len(bounds) - 1)
        return torch.cat([F.scaled_dot_product_attention(
            q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1),
            is_causal=True, scale=scale, enable_gqa=gqa).transpose(0, 1)
            for a, b in zip(bounds, bounds[1:])])

    def since_2_11(q, k, v, cu_q, cu_k, max_q, max_k, *, return_aux=None, scale=None,
                   window_size=(-1, -1), enable_gqa=False):
        assert tuple(window_size) == (-1, 0)                 # causal
        return attend(q, k, v, cu_q, cu_k, max_q, max_k, scale, enable_gqa)

    def torch_2_10(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=False, return_aux=None):
        assert is_causal and q.shape[1] == k.shape[1]        # no GQA: heads repeated first
        return attend(q, k, v, cu_q, cu_k, max_q, max_k)

    fn = since_2_11 if signature == "2.11" else torch_2_10
    import inspect
    return fn, frozenset(inspect.signature(fn).parameters)


@pytest.fixture
def cpu_as_gpu(monkeypatch):
    """The varlen path on the CPU, with the reference kernel; yields its calls and the masks
    transformers built."""
    from transformers import masking_utils
    calls, masks = [], []
    real_mask = masking_utils.sdpa_mask
    monkeypatch.setattr(masking_utils, "sdpa_mask",
                        lambda **kw: masks.append(kw["q_length"]) or real_mask(**kw))
    monkeypatch.setattr(attention, "VARLEN_DEVICES", ("cuda", "cpu"))

    def use(signature):
        kernel = reference_varlen(signature, calls)
        monkeypatch.setattr(attention, "_varlen_kernel", lambda: kernel)
    return use, calls, masks


@pytest.mark.parametrize("signature", ["2.11", "2.10"])
@pytest.mark.parametrize("kind", ["packed", "flat"])
def test_packed_sequences_on_a_gpu_run_the_varlen_kernel_and_no_mask(tiny_model_dir, kind,
                                                                      signature, cpu_as_gpu):
    use, calls, masks = cpu_as_gpu
    use(signature)
    ref, fast = two_models(tiny_model_dir)
    exact = copy.deepcopy(ref).float()
    b = batch(kind)
    outs = []
    for model in (exact, ref, fast):
        calls.clear()
        out = model(**b, use_cache=False)
        out.logits.float().pow(2).mean(-1).sum().backward()
        outs.append((out.logits.float(), model.model.layers[0].self_attn.q_proj.weight.grad))
        if model is fast:
            # every layer, every sequence: 3 in each of the packed rows' 3 rows, or the flat 3
            assert calls == [9 if kind == "packed" else 3] * 2
            assert masks == [] or masks == [40, 40]   # the fp32 and bf16 SDPA models' masks
    (l32, g32), (l_sdpa, g_sdpa), (l_fast, g_fast) = outs

    def off(x, y):
        return ((x - y.float()).norm() / y.float().norm()).item()
    assert off(l_fast, l32) < 1.5 * off(l_sdpa, l32) + 1e-3, (off(l_fast, l32), off(l_sdpa, l32))
    assert off(g_fast, g32) < 1.5 * off(g_sdpa, g32) + 1e-3, (off(g_fast, g32), off(g_sdpa, g32))


def test_rows_with_padding_or_one_sequence_each_stay_off_the_varlen_kernel(tiny_model_dir,
                                                                           cpu_as_gpu):
    use, calls, masks = cpu_as_gpu
    use("2.11")
    _, fast = two_models(tiny_model_dir)
    with torch.no_grad():
        fast(**batch("right-padded"), use_cache=False)
        assert calls == [] and masks == [40]          # padding: SDPA's mask, as before
        masks.clear()
        fast(**batch("causal"), use_cache=False)
        assert calls == [] and masks == []            # plain causal rows: no mask, no kernel
        fast.float()(**batch("packed"), use_cache=False)
        assert calls == [] and masks == [40]          # fp32 (FlashAttention has none): a mask


def test_flat_forwards_are_chosen_on_a_gpu_only_where_the_varlen_kernel_runs(tiny_model_dir,
                                                                             monkeypatch):
    from tunelab.train.run import _flat_forwards_pay
    gpu = torch.device("cuda")
    capability = [(9, 0)]                                        # a Hopper GPU
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: capability[0])
    ref, fast = two_models(tiny_model_dir)
    assert _flat_forwards_pay(fast, gpu) and _flat_forwards_pay(fast, torch.device("cpu"))
    capability[0] = (7, 5)                                       # a T4: no FlashAttention
    assert not _flat_forwards_pay(fast, gpu)
    capability[0] = (8, 0)
    assert not _flat_forwards_pay(ref, gpu)                      # plain SDPA: a mask
    assert not _flat_forwards_pay(copy.deepcopy(fast).float(), gpu)
    other = copy.deepcopy(fast)
    other.config.model_type = "gemma2"                           # soft-capped scores
    assert not _flat_forwards_pay(other, gpu)
    other.config.model_type, other.config.sliding_window = "mistral", 16
    assert not _flat_forwards_pay(other, gpu)

