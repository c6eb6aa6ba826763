"""Supervised stages in plain torch: examples, batching, schedule, losses that learn, held-out evaluation.

The same stages on Ray Train + DeepSpeed: tests/integration/test_supervised_ray_train.py.
"""
from __future__ import annotations

import json
import random

import pytest
import torch

from tlcr_ray import training as stages
from tlcr_ray.config import TrainConfig, load_config
from tlcr_ray.data.pairs import PreferencePair
from tlcr_ray.labeling.labels import write_labels
from tlcr_ray.layout import RunLayout
from tlcr_ray.models import SequenceRewardModel, TokenDiscriminator, load_policy

NEG, POS = 1000, 2000  # the planted rule of the `planted_rows` fixture (conftest.py)


def fit_in_process(stage, model, examples, steps, lr, pad_id, micro_batch=8):
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    batches = stages.micro_batches(examples, micro_batch, rank=0, world_size=1, seed=0)
    losses = []
    for _ in range(steps):
        loss, _, _ = stages.compute_loss(stage, model, stages.collate(stage, next(batches), pad_id))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def accuracy(stage, model, examples, pad_id) -> float:
    model.eval()
    _, correct, counted = stages.compute_loss(stage, model, stages.collate(stage, examples, pad_id))
    return correct / counted


# ---------------------------------------------------------------- pure pieces

def test_truncate_drops_prompt_first_then_response_end():
    ids, targets = stages.truncate(list(range(10)), list("pppprrrrrr"), response_start=4, max_len=8)
    assert ids == [2, 3, 4, 5, 6, 7, 8, 9] and targets == list("pprrrrrr")
    ids, targets = stages.truncate(list(range(10)), list("pppprrrrrr"), response_start=4, max_len=3)
    assert ids == [4, 5, 6] and targets == list("rrr")


def test_collate_pads_right_per_batch():
    batch = stages.collate("disc", [{"input_ids": [5, 6, 7], "targets": [-100, 1, 0]},
                                    {"input_ids": [8], "targets": [0.5]}], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["targets"].tolist() == [[-100, 1, 0], [0.5, -100, -100]]
    rm = stages.collate("rm", [{"chosen_ids": [1, 2], "rejected_ids": [3]}], pad_id=9)
    assert rm["input_ids"].tolist() == [[1, 2], [3, 9]]


def test_lr_schedule():
    assert stages.lr_factor(0, 10, 0, "cosine") == 1.0
    assert stages.lr_factor(5, 10, 0, "cosine") == pytest.approx(0.5)
    assert stages.lr_factor(0, 10, 3, "constant") == pytest.approx(0.25)
    assert stages.lr_factor(7, 10, 0, "constant") == 1.0
    with pytest.raises(ValueError, match="lr_schedule"):
        stages.lr_factor(0, 10, 0, "linear")


def test_cosine_schedule_values_and_the_ppo_optimizer_step_count():
    import math

    from tlcr_ray.config import PPOConfig
    from tlcr_ray.rl.learner import minibatches_per_epoch, optimizer_steps_per_update

    # Cosine without warm-up (the paper's PPO schedule): 1 at step 0, 0.5 half way, -> 0 at the end.
    for step, expected in ((0, 1.0), (10, 0.5 * (1 + math.cos(math.pi * 0.25))), (20, 0.5), (39, 0.0015413),
                           (40, 0.0)):
        assert stages.lr_factor(step, 40, 0, "cosine") == pytest.approx(expected, abs=1e-6)
    # Warm-up 4 over 24 decay steps: linear (k + 1) / 5, then the cosine restarts from 1.
    assert [stages.lr_factor(k, 28, 4, "cosine") for k in range(5)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert stages.lr_factor(16, 28, 4, "cosine") == pytest.approx(0.5)
    # PPOLearner.train's count: one optimizer step per mini-batch of the whole batch (the last may be
    # short), whatever the ranks and the micro-batch (gradients accumulate; rl/minibatches.py).
    assert minibatches_per_epoch(8, 8) == 1 and minibatches_per_epoch(8, 4) == 2 and minibatches_per_epoch(5, 4) == 2
    cfg = PPOConfig(prompts_per_step=8, mini_batch_size=4, ppo_epochs=3)
    assert optimizer_steps_per_update(cfg, world_size=1) == 6 and optimizer_steps_per_update(cfg, world_size=2) == 6
    assert optimizer_steps_per_update(PPOConfig(prompts_per_step=6, mini_batch_size=4, ppo_epochs=2), 4) == 4
    assert optimizer_steps_per_update(PPOConfig(prompts_per_step=8, mini_batch_size=8, micro_batch_size=1), 2) == 1


def test_micro_batches_shard_evenly_and_resume_in_place():
    examples = [{"i": i} for i in range(11)]
    ranks = [[b for _, b in zip(range(6), stages.micro_batches(examples, 2, r, 2, seed=3))] for r in range(2)]
    epoch0 = [e["i"] for r in ranks for b in r[:3] for e in b]
    assert sorted(epoch0) == sorted(set(epoch0)) and len(epoch0) == 10  # 5 each, no overlap
    resumed = [b for _, b in zip(range(2), stages.micro_batches(examples, 2, 0, 2, seed=3, start=4))]
    assert resumed == ranks[0][4:6]


def test_heldout_is_deterministic_and_keeps_pairs_together():
    examples = [{"pair_id": f"p{i // 2}"} for i in range(400)]
    train, heldout = stages.split_heldout(examples, 0.2, seed=0)
    assert 40 < len(heldout) < 120 and len(heldout) % 2 == 0  # ~20% of 200 pairs, two rows each
    assert {e["pair_id"] for e in train}.isdisjoint({e["pair_id"] for e in heldout})
    assert stages.split_heldout(examples, 0.2, seed=0) == (train, heldout)


def test_heldout_is_independent_of_the_data_partition():
    from tlcr_ray.data.pairs import partition

    pairs = [PreferencePair(f"{i:016x}", "p", "c", "r", "t") for i in range(500)]
    first = partition(pairs, seed=0)["sft"][:40]  # what data.max_pairs keeps
    train, heldout = stages.split_heldout([{"pair_id": p.pair_id} for p in first], 0.2, seed=0)
    assert train and heldout


def test_deepspeed_config_follows_train_config():
    ds = stages.stage_deepspeed_config(TrainConfig(micro_batch_size=3, grad_accum=2, zero_stage=2, precision="bf16"))
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_accumulation_steps"] == 2
    assert ds["zero_optimization"]["stage"] == 2 and ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    with pytest.raises(ValueError, match="precision"):
        stages.stage_deepspeed_config(TrainConfig(precision="fp8"))


def test_sft_examples_train_only_on_the_response(tokenizer):
    cfg = load_config("configs/tiny.yaml")
    pair = PreferencePair("x", "\n\nHuman: hi\n\nAssistant:", " Hello there!", " Go away.", "t:1")
    (example,) = stages.sft_examples([pair], tokenizer, cfg.model, max_len=96)
    labelled = [t for t in example["labels"] if t != stages.IGNORE]
    assert tokenizer.decode(labelled) == " Hello there!" + tokenizer.eos_token
    assert example["input_ids"][-len(labelled):] == labelled


def test_a_truncated_response_gets_no_eos(tokenizer):
    """A response cut at model.max_response_len did not end: its SFT and RM sequences carry no EOS (an
    EOS there would teach the policy to stop mid-sentence); one cut by max_len loses its EOS too."""
    cfg = load_config("configs/tiny.yaml", ["model.max_response_len=4"])
    eos = tokenizer.eos_token_id
    prompt = "\n\nHuman: hi\n\nAssistant:"
    long, short = " Hello there, how are you doing today?", " Hi."
    n_long, n_short = (len(tokenizer.encode(text, add_special_tokens=False)) for text in (long, short))
    assert n_long > 4 >= n_short
    pair = PreferencePair("x", prompt, long, short, "t:1")
    (sft,) = stages.sft_examples([pair], tokenizer, cfg.model, max_len=96)
    labelled = [t for t in sft["labels"] if t != stages.IGNORE]
    assert len(labelled) == 4 and eos not in sft["input_ids"]
    (rm,) = stages.rm_examples([pair], tokenizer, cfg.model, max_len=96)
    assert eos not in rm["chosen_ids"] and rm["rejected_ids"][-1] == eos  # the short one ended
    # max_len drops the prompt first, then cuts the response of an example that ended: its EOS goes first.
    short_ids = tokenizer.encode(short, add_special_tokens=False)
    (cut,) = stages.rm_examples([PreferencePair("y", prompt, short, " No.", "t:2")], tokenizer, cfg.model,
                                max_len=len(short_ids))
    assert cut["chosen_ids"] == short_ids


# ---------------------------------------------------------------- learning, in-process

# Both directions of the rule from the same initial model: a lucky init cannot pass both.
@pytest.mark.parametrize("neg,pos", [(NEG, POS), (POS, NEG)])
def test_discriminator_learns_planted_rule(neg, pos, tiny_model_dir, tokenizer, planted_rows):
    torch.manual_seed(0)
    model = TokenDiscriminator.from_pretrained(tiny_model_dir, seed=0)
    train = stages.disc_examples(planted_rows(64, seed=1, neg=neg, pos=pos), max_len=64)
    heldout = stages.disc_examples(planted_rows(32, seed=2, neg=neg, pos=pos), max_len=64)
    fit_in_process("disc", model, train, steps=40, lr=3e-3, pad_id=tokenizer.pad_token_id)
    assert accuracy("disc", model, heldout, tokenizer.pad_token_id) >= 0.95


def test_sft_loss_falls(tiny_model_dir, tokenizer):
    torch.manual_seed(0)
    cfg = load_config("configs/tiny.yaml")
    pairs = [PreferencePair(f"p{i}", f"\n\nHuman: say {i}\n\nAssistant:", f" I say {i} to you.", " no", "t")
             for i in range(8)]
    examples = stages.sft_examples(pairs, tokenizer, cfg.model, max_len=64)
    model = load_policy(tiny_model_dir)
    losses = fit_in_process("sft", model, examples, steps=15, lr=3e-3, pad_id=tokenizer.pad_token_id)
    assert losses[-1] < 0.6 * losses[0] and losses == sorted(losses, reverse=True)


def test_rm_prefers_chosen_on_planted_pattern(tiny_model_dir, tokenizer):
    torch.manual_seed(0)
    rng = random.Random(0)
    words = "apple river stone cloud paper green window light music table".split()

    def pairs(n, tag):
        out = []
        for i in range(n):
            body = " " + " ".join(rng.choice(words) for _ in range(5))
            out.append(PreferencePair(f"{tag}{i}", "\n\nHuman: talk\n\nAssistant:", body + " thanks",
                                      body + " whatever", "t"))
        return out

    cfg = load_config("configs/tiny.yaml")
    train = stages.rm_examples(pairs(48, "a"), tokenizer, cfg.model, 64)
    heldout = stages.rm_examples(pairs(24, "b"), tokenizer, cfg.model, 64)
    model = SequenceRewardModel.from_pretrained(tiny_model_dir, seed=0)
    fit_in_process("rm", model, train, steps=30, lr=3e-3, pad_id=tokenizer.pad_token_id)
    assert accuracy("rm", model, heldout, tokenizer.pad_token_id) >= 0.95


# ---------------------------------------------------------------- tlcr eval disc | rm

def _write_pairs(path, n: int) -> None:
    rng = random.Random(5)
    words = "apple river stone cloud paper green window light music table".split()
    with open(path, "w") as fh:
        for i in range(n):
            a, b, c = (rng.choice(words) for _ in range(3))
            prompt = f"\n\nHuman: Tell me about the {a} number {i}.\n\nAssistant:"
            fh.write(json.dumps({"chosen": f"{prompt} The {a} is {b} and kindly {c}.",
                                 "rejected": f"{prompt} The {a} is {b} and rudely {c}."}) + "\n")


def test_eval_disc_and_rm_on_heldout_pairs(tiny_model_dir, tokenizer, tmp_path):
    from argparse import Namespace

    from tlcr_ray.data.pairs import load_split
    from tlcr_ray.eval.heldout import run_cli
    from tlcr_ray.labeling.labels import label_pair
    from tlcr_ray.models import save_head_model

    _write_pairs(tmp_path / "pairs.jsonl", 100)
    cfg = load_config("configs/tiny.yaml", [f"output_dir={tmp_path / 'run'}", f"model.base={tiny_model_dir}",
                                            f"data.path={tmp_path / 'pairs.jsonl'}", "data.max_pairs=null"])
    pairs, _ = load_split(cfg.data, "all")
    rows = [row for p in pairs for row in label_pair(tokenizer, p.pair_id, p.prompt, p.rejected, p.chosen)]
    write_labels(RunLayout.of(cfg).label_output, rows)

    torch.manual_seed(0)
    disc = TokenDiscriminator.from_pretrained(tiny_model_dir, seed=0)
    train, heldout, _ = stages.stage_examples(cfg, "disc", tokenizer)
    assert heldout and not {e["pair_id"] for e in train} & {e["pair_id"] for e in heldout}
    fit_in_process("disc", disc, train, steps=40, lr=3e-3, pad_id=tokenizer.pad_token_id)
    save_head_model(disc, RunLayout.of(cfg).stage("disc").model, tokenizer)
    result = run_cli(cfg, Namespace(target="disc"))
    assert json.loads((RunLayout.of(cfg).stage("disc").eval).read_text())["token_accuracy"] == result["token_accuracy"]
    assert result["token_accuracy"] >= 0.95 and result["heldout_pairs"] == len(heldout) // 2
    assert result["positive_recall"] >= 0.9 and result["negative_recall"] >= 0.9
    assert result["chosen_vs_rejected_accuracy"] >= 0.9

    rm = SequenceRewardModel.from_pretrained(tiny_model_dir, seed=0)
    train, heldout, _ = stages.stage_examples(cfg, "rm", tokenizer)
    fit_in_process("rm", rm, train, steps=30, lr=3e-3, pad_id=tokenizer.pad_token_id)
    save_head_model(rm, RunLayout.of(cfg).stage("rm").model, tokenizer)
    result = run_cli(cfg, Namespace(target="rm"))
    assert result["pairs"] == len(heldout) > 0 and result["pairwise_accuracy"] >= 0.9


@pytest.mark.parametrize("stage", ["sft", "disc", "rm"])
def test_gradient_checkpointing_is_on_and_gives_the_same_loss_and_gradients(stage, tiny_model_dir):
    """<stage>.gradient_checkpointing: HF's (non-reentrant) on the LM or the head model's backbone,
    recomputing layers in backward: the same numbers, less saved activations."""
    from tlcr_ray.training.loop import build_model

    batch = stages.collate(stage, _examples(stage), 0)
    results = []
    for on in (False, True):
        model = build_model(stage, tiny_model_dir, seed=3, gradient_checkpointing=on).train()
        target = getattr(model, "backbone", model)
        assert target.is_gradient_checkpointing is on
        calls = []
        layer = target.model.layers[0] if stage == "sft" else target.layers[0]
        layer.register_forward_pre_hook(lambda m, a: calls.append(1))
        loss, _, _ = stages.compute_loss(stage, model, batch)
        loss.backward()
        # Checkpointed, the layer runs again in backward (the recomputation): twice per step.
        assert len(calls) == (2 if on else 1)
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (loss_off, grads_off), (loss_on, grads_on) = results
    assert torch.allclose(loss_on, loss_off, atol=1e-6) and len(grads_on) == len(grads_off) > 0
    assert max((a - b).abs().max().item() for a, b in zip(grads_on, grads_off)) < 1e-5


def _examples(stage: str) -> list[dict]:
    """Four collate-ready examples of 5..11 random tokens in the stage's format."""
    g = random.Random(7)
    seqs = [[g.randrange(3000, 3100) for _ in range(n)] for n in (5, 11, 8, 6)]
    if stage == "sft":
        return [{"input_ids": s, "labels": [-100] * 2 + s[2:]} for s in seqs]
    if stage == "disc":
        return [{"input_ids": s, "targets": [-100.0] * 2 + [float(t % 2) for t in s[2:]]} for s in seqs]
    return [{"chosen_ids": seqs[i], "rejected_ids": seqs[i + 1]} for i in (0, 2)]
