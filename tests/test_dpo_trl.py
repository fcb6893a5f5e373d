"""DPO pinned against TRL's DPOTrainer, and the masks of chosen and rejected on real templates.

TRL is the reference implementation users trust. Both sides get the same tiny model, the same
weights, the same beta and exactly the same tokens: TRL's trainer is fed tunelab's rendered ids
as the prompt_ids / chosen_ids / rejected_ids its own tokenization would produce (that step is
skipped), because its chat-template tokenization would also train the "\\n" after <|im_end|>,
which tunelab deliberately does not (last test of the first part).
The per-pair losses and the chosen / rejected rewards then agree within 1e-4, for the sigmoid
and the IPO loss, with a policy that differs from its reference:
  - lora: a LoRA with non-zero weights; the reference is the same model, adapter switched off;
  - full: perturbed weights; tunelab precomputes the reference log-probabilities before
    training (DPO.before_training), TRL keeps a separate reference model.
tunelab scores all pairs in one padded batch; TRL scores one pair per call, unpadded: padding
cannot change a pair's numbers.
"""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest

from tunelab.data.preference import PreferencePair
from tunelab.data.render import IGNORE_INDEX, end_of_turn_token
from tunelab.objectives.dpo import DPO, DPOSettings, pad_pairs, render_pairs

# test_render pins the real templates (Llama 3, Gemma, Qwen, Phi, Mistral, ...) for SFT; the
# masks of preference pairs are checked on the very same templates.
from test_render import FAMILIES, TWO_TURNS, family, trained_tokens, visualize

SYSTEM = {"role": "system", "content": "You rate product reviews."}
PAIRS = [
    PreferencePair([{"role": "user", "content": "Rate: the blender is superb. Stars?"}],
                   "5", "I think this deserves five stars, because the reviewer is clearly "
                        "delighted with the blender and its motor."),
    PreferencePair([SYSTEM, {"role": "user", "content": "Rate: awful zippers, the straps "
                                                        "broke in a week. Stars?"}],
                   "1", "One star."),
    PreferencePair([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                    {"role": "user", "content": "Rate: decent lamp, dim base. Stars?"}],
                   "3 stars: decent but flawed.", "3"),
    PreferencePair([SYSTEM, {"role": "user", "content": "Rate: good kettle. Stars?"}],
                   "4", "Hmm, hard to say, maybe four, maybe three, maybe five?"),
]


# ---------------------------------------------------------------------------------------------
# tunelab's rows -> TRL's pre-tokenized form


def first_trained(labels) -> int:
    return next(k for k, lab in enumerate(labels) if lab != IGNORE_INDEX)


def answer_ids(row, side: str) -> list[int]:
    """The trained tokens of one side: one contiguous run whose labels are the ids themselves."""
    ids, labels = row[f"{side}_input_ids"], row[f"{side}_labels"]
    trained = [k for k, lab in enumerate(labels) if lab != IGNORE_INDEX]
    assert trained == list(range(trained[0], trained[-1] + 1)), "one trained run per side"
    assert labels[trained[0]:trained[-1] + 1] == ids[trained[0]:trained[-1] + 1]
    return ids[trained[0]:trained[-1] + 1]


def as_trl(row) -> dict[str, list[int]]:
    start = first_trained(row["chosen_labels"])
    # Tokens after the last trained one (ChatML's "\n") cannot change the log-probability of
    # earlier ones: dropping them is exact, and TRL trains every completion token it is given.
    return {"prompt_ids": row["chosen_input_ids"][:start],
            "chosen_ids": answer_ids(row, "chosen"), "rejected_ids": answer_ids(row, "rejected")}


def trl_trainer(model, rows, tokenizer, out, *, beta, loss_type, ref_model=None,
                peft_config=None):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    class PreTokenizedDPOTrainer(DPOTrainer):
        # The dataset already holds what DPOTrainer._prepare_dataset would produce.
        def _prepare_dataset(self, dataset, *args, **kwargs):
            return dataset

    args = DPOConfig(output_dir=str(out), use_cpu=True, bf16=False, beta=beta,
                     loss_type=loss_type, report_to="none", activation_checkpointing=False,
                     max_length=None)
    return PreTokenizedDPOTrainer(model=model, ref_model=ref_model, args=args,
                                  train_dataset=Dataset.from_list([as_trl(r) for r in rows]),
                                  processing_class=tokenizer, peft_config=peft_config)


def trl_per_pair(trainer, rows):
    """(loss, chosen reward, rejected reward) of each pair, one DPOTrainer._compute_loss call per
    pair (its loss is a mean over the batch and its rewards are logged as means)."""
    import torch
    trainer.model.eval()
    out = []
    for r in rows:
        batch = trainer.data_collator([as_trl(r)])
        with torch.no_grad():
            loss = trainer._compute_loss(trainer.model, batch, return_outputs=False)
        logged = trainer._metrics["eval"]
        out.append((float(loss), logged["rewards/chosen"][-1], logged["rewards/rejected"][-1]))
    return torch.tensor(out, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
# the two policies: a LoRA with non-zero weights, and perturbed full weights


def lora_config():
    from peft import LoraConfig
    return LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                      task_type="CAUSAL_LM")


def load_tiny(folder):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(folder)
    return model.eval()


def nudge(params, scale: float, seed: int) -> None:
    """Add seeded noise to each parameter (in name order): the same on any copy."""
    import torch
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(params, key=lambda kv: kv[0]):
            p.add_(torch.randn(p.shape, generator=g) * scale)


def tunelab_scores(model, rows, pad_id, beta, loss_type):
    """tunelab's per-pair (loss, chosen reward, rejected reward), all pairs in one padded batch,
    through DPO.loss (what training calls); and the LossPart it returned."""
    import torch

    from tunelab.batching import sequence_logps
    from tunelab.objectives.dpo import pair_scores, reference_logps
    cfg = SimpleNamespace(dpo=DPOSettings(beta=beta, loss_type=loss_type))
    batch = pad_pairs(rows, pad_id)
    assert len({len(r["chosen_input_ids"]) for r in rows}) > 1   # the batch really pads
    with torch.no_grad():
        part = DPO().loss(model, batch, cfg)
        ref = reference_logps(model, batch)
        logps, tokens = sequence_logps(model, batch)
        losses, chosen, rejected = pair_scores(logps, ref, tokens, beta, loss_type)
    return torch.stack([losses, chosen, rejected], dim=1).double(), part


@pytest.fixture(scope="module")
def pair_rows(smol_tokenizer):
    return render_pairs(PAIRS, smol_tokenizer, max_length=None)


@pytest.mark.parametrize("loss_type,beta", [("sigmoid", 0.1), ("ipo", 0.1), ("sigmoid", 0.5)])
@pytest.mark.parametrize("method", ["lora", "full"])
def test_losses_and_rewards_match_trl_dpo_trainer(tiny_model_dir, smol_tokenizer, pair_rows,
                                                  tmp_path, method, loss_type, beta):
    import torch
    from peft import get_peft_model
    torch.manual_seed(0)
    tok = copy.deepcopy(smol_tokenizer)   # DPOTrainer sets the pad token on what it is given
    pad_id = smol_tokenizer.pad_token_id
    rows = copy.deepcopy(pair_rows)
    if method == "lora":
        ours = get_peft_model(load_tiny(tiny_model_dir), lora_config()).eval()
        lora = [(n, p) for n, p in ours.named_parameters() if "lora_" in n]
        nudge(lora, 0.2, seed=1)     # lora_B starts at zero: the policy would be the reference
        trainer = trl_trainer(load_tiny(tiny_model_dir), rows, tok, tmp_path, beta=beta,
                              loss_type=loss_type, peft_config=lora_config())
        # TRL wrapped its own copy of the model in the same LoRA: give it the same weights
        theirs = dict(trainer.model.named_parameters())
        assert {n for n, _ in lora} <= set(theirs)
        with torch.no_grad():
            for n, p in lora:
                theirs[n].copy_(p)
    else:
        ours = load_tiny(tiny_model_dir)
        # the reference: the starting weights' log-probabilities, computed before training
        DPO().before_training(ours, {"train": rows}, None, pad_token_id=pad_id, batch_size=3)
        assert all("ref_chosen_logps" in r for r in rows)
        nudge(list(ours.named_parameters()), 0.03, seed=1)
        policy = load_tiny(tiny_model_dir)
        nudge(list(policy.named_parameters()), 0.03, seed=1)
        trainer = trl_trainer(policy, rows, tok, tmp_path, beta=beta, loss_type=loss_type,
                              ref_model=load_tiny(tiny_model_dir))

    tunelab, part = tunelab_scores(ours, rows, pad_id, beta, loss_type)
    trl = trl_per_pair(trainer, rows)
    # not a vacuous match (100x the tolerance): the policy really moved away from its
    # reference, and scores the two answers of a pair differently
    assert tunelab[:, 1:].abs().mean() > 0.01, tunelab
    assert (tunelab[:, 1] - tunelab[:, 2]).abs().mean() > 0.01, tunelab
    torch.testing.assert_close(tunelab, trl, atol=1e-4, rtol=0)
    # what training logs is the sum of the same numbers
    assert float(part.loss_sum) == pytest.approx(float(trl[:, 0].sum()), abs=1e-4)
    assert float(part.stats["reward_chosen"]) == pytest.approx(float(trl[:, 1].sum()), abs=1e-4)
    assert float(part.stats["reward_rejected"]) == pytest.approx(float(trl[:, 2].sum()),
                                                                 abs=1e-4)
    assert int(part.stats["reward_correct"]) == int((trl[:, 1] > trl[:, 2]).sum())
    assert int(part.stats["pairs"]) == len(rows)


def test_trl_would_train_the_newline_after_im_end_tunelab_does_not(tiny_model_dir,
                                                                   smol_tokenizer, pair_rows,
                                                                   tmp_path):
    """Why TRL is fed tunelab's ids: from the same conversational pairs, TRL's own
    tokenization trains one more token per answer, the "\\n" after <|im_end|>."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer
    tok = copy.deepcopy(smol_tokenizer)
    ds = Dataset.from_list([{"prompt": p.prompt,
                             "chosen": [{"role": "assistant", "content": p.chosen}],
                             "rejected": [{"role": "assistant", "content": p.rejected}]}
                            for p in PAIRS])
    args = DPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none",
                     activation_checkpointing=False)
    trainer = DPOTrainer(model=load_tiny(tiny_model_dir), args=args, train_dataset=ds,
                         processing_class=tok, peft_config=lora_config())
    newline = tok.encode("\n", add_special_tokens=False)
    for theirs, row in zip(trainer.train_dataset, pair_rows):
        ours = as_trl(row)
        assert theirs["prompt_ids"] == ours["prompt_ids"]
        for side in ("chosen", "rejected"):
            assert theirs[f"{side}_ids"] == ours[f"{side}_ids"] + newline


# ---------------------------------------------------------------------------------------------
# masks of chosen and rejected, token by token, on the real templates the SFT tests pin

CHOSEN, REJECTED = "Bye", "Goodbye, see you soon."


def two_turn_pair(name: str) -> PreferencePair:
    """System (where the template has one) + user, assistant, user: two answers to the last."""
    prompt = TWO_TURNS[:4] if FAMILIES[name][2] else TWO_TURNS[1:4]
    return PreferencePair([dict(m) for m in prompt], CHOSEN, REJECTED, source="pairs.jsonl:3")


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_only_the_final_answer_and_its_end_of_turn_are_trained(fresh_tokenizer, name):
    tok = family(fresh_tokenizer, name)
    pair = two_turn_pair(name)
    row = render_pairs([pair], tok, max_length=None)[0]
    eot = end_of_turn_token(tok)
    sides = {}
    for side, answer in (("chosen", CHOSEN), ("rejected", REJECTED)):
        ids, labels = row[f"{side}_input_ids"], row[f"{side}_labels"]
        assert len(ids) == len(labels)
        # the whole conversation is there, the earlier answer included, and it is not trained
        text = visualize(tok, {"input_ids": ids, "labels": labels})
        assert "Hello there!" in text and "[[Hello" not in text
        runs = trained_tokens(tok, {"input_ids": ids, "labels": labels})
        assert len(runs) == 1, text
        trained = "".join(runs[0])
        assert runs[0][-1] == eot and trained.endswith(answer + eot), text
        # before the answer only what the template writes at the start of every reply
        assert trained[:-len(answer + eot)].strip() in ("", "<think>\n\n</think>"), text
        # after it, nothing trained: the template's own closing (ChatML's "\n", Phi's EOS)
        last = max(k for k, lab in enumerate(labels) if lab != IGNORE_INDEX)
        assert all(lab == IGNORE_INDEX for lab in labels[last + 1:])
        assert tok.decode(ids[last + 1:]) in ("", "\n", "\n<|endoftext|>"), text
        sides[side] = (ids, labels, text)
    # the prompt tokens of the two sides are identical, and both answers start right after them
    start = first_trained(sides["chosen"][1])
    assert sides["chosen"][0][:start] == sides["rejected"][0][:start]
    assert first_trained(sides["rejected"][1]) == start
    # ... and they are the text inference prompts with (the tokens may differ at the boundary:
    # with this BPE, Llama 3's "\n\n" before an answer is two tokens, alone it is one)
    from tunelab.data.render import render_prompt
    assert tok.decode(sides["chosen"][0][:start]) == tok.decode(render_prompt(pair.prompt, tok))


@pytest.mark.parametrize("name,chosen", [
    ("chatml",
     "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
     "<|im_start|>assistant\nHello there!<|im_end|>\n<|im_start|>user\nBye?<|im_end|>\n"
     "<|im_start|>assistant\n[[Bye<|im_end|>]]\n"),
    ("llama3.1",
     "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: "
     "December 2023\nToday Date: 26 Jul 2024\n\nBe brief.<|eot_id|>"
     "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
     "<|start_header_id|>assistant<|end_header_id|>\n\nHello there!<|eot_id|>"
     "<|start_header_id|>user<|end_header_id|>\n\nBye?<|eot_id|>"
     "<|start_header_id|>assistant<|end_header_id|>\n\n[[Bye<|eot_id|>]]"),
    ("gemma2",
     "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello there!<end_of_turn>"
     "\n<start_of_turn>user\nBye?<end_of_turn>\n<start_of_turn>model\n[[Bye<end_of_turn>]]\n"),
    ("mistral-v0.3", "<s>[INST] Hi[/INST] Hello there!</s>[INST] Bye?[/INST][[ Bye</s>]]"),
    ("phi3.5",
     "<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\nHello there!<|end|>\n"
     "<|user|>\nBye?<|end|>\n<|assistant|>\n[[Bye<|end|>]]\n<|endoftext|>"),
    # Qwen3 shows the empty think block on the turn it trains, not on earlier turns
    ("qwen3",
     "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
     "<|im_start|>assistant\nHello there!<|im_end|>\n<|im_start|>user\nBye?<|im_end|>\n"
     "<|im_start|>assistant\n[[<think>\n\n</think>\n\nBye<|im_end|>]]\n"),
])
def test_pair_masks_pinned(fresh_tokenizer, name, chosen):
    tok = family(fresh_tokenizer, name)
    row = render_pairs([two_turn_pair(name)], tok, max_length=None)[0]
    ours = {side: visualize(tok, {"input_ids": row[f"{side}_input_ids"],
                                  "labels": row[f"{side}_labels"]}) for side in ("chosen",
                                                                                 "rejected")}
    assert ours["chosen"] == chosen
    # the rejected side is the same text with the other answer in the trained span
    lead = "<think>\n\n</think>\n\n" if name == "qwen3" else " " if name == "mistral-v0.3" else ""
    assert ours["rejected"] == chosen.replace(f"[[{lead}{CHOSEN}", f"[[{lead}{REJECTED}")
