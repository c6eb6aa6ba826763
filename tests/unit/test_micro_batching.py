"""Micro-batching and residency without Ray: which rows each learner rank runs (no row twice, placeholders
weigh 0), every scoring forward sees at most one micro-batch with use_cache=False and gives the same
numbers as one whole-batch forward, the loss normaliser, and the offload call sequence.

    .venv/bin/python -m pytest tests/unit/test_micro_batching.py -q
"""
from __future__ import annotations

import pytest
import torch

from tlcr_ray.rl.minibatches import micro_steps_per_minibatch, rank_schedule


# --- which rows each rank runs -------------------------------------------------------------------

@pytest.mark.parametrize("batch, mini, micro, world", [(8, 8, 1, 1), (8, 8, 4, 1), (5, 4, 1, 2), (7, 4, 2, 3),
                                                       (3, 8, 2, 4), (10, 3, 1, 2)])
def test_every_row_runs_once_per_epoch_and_ranks_run_the_same_number_of_micro_steps(batch, mini, micro, world):
    ranks = [rank_schedule(batch, mini, micro, world, r, epochs=2, seed=5) for r in range(world)]
    steps = micro_steps_per_minibatch(mini, micro, world)
    assert len({len(s) for s in ranks}) == 1 and len(ranks[0]) == 2 * -(-batch // mini)  # optimizer steps
    for k in range(len(ranks[0])):
        groups = [s[k] for s in ranks]
        assert all(len(g) == steps for g in groups)  # each backward is collective: same count on every rank
        minibatch = groups[0][0].minibatch
        real = [row for g in groups for step in g if step.weight for row in step.rows]
        assert sorted(real) == sorted(minibatch)  # each row of the mini-batch exactly once, over all ranks
        assert all(1 <= len(step.rows) <= micro for g in groups for step in g)
        assert all(step.weight in (0.0, 1.0) and step.minibatch == minibatch for g in groups for step in g)
    for epoch in range(2):  # each epoch is one permutation of the whole batch
        per_epoch = ranks[0][epoch * -(-batch // mini):(epoch + 1) * -(-batch // mini)]
        assert sorted(r for g in per_epoch for r in g[0].minibatch) == list(range(batch))


def test_a_rank_with_fewer_rows_runs_zero_weight_placeholders_not_a_repeated_row():
    # 5 rows, one mini-batch of 5, 2 ranks of micro 1: rank 0 takes 3 rows, rank 1 two and a placeholder.
    r0, r1 = (rank_schedule(5, 5, 1, 2, r, epochs=1, seed=0)[0] for r in range(2))
    assert [s.weight for s in r0] == [1.0, 1.0, 1.0] and [s.weight for s in r1] == [1.0, 1.0, 0.0]
    assert len({s.rows[0] for s in r0 + r1 if s.weight}) == 5


def test_the_schedule_is_the_same_on_every_rank_and_for_every_micro_size():
    # Rank-independent permutation: the mini-batches (and so the update) do not depend on micro or world.
    a = [g[0].minibatch for g in rank_schedule(9, 4, 1, 1, 0, 1, seed=3)]
    b = [g[0].minibatch for g in rank_schedule(9, 4, 4, 2, 1, 1, seed=3)]
    assert a == b


def test_the_loss_normaliser_makes_micro_batch_sums_the_whole_mini_batch_token_mean():
    from tlcr_ray.rl.ppo_math import masked_mean, policy_loss, value_loss

    g = torch.Generator().manual_seed(0)
    lp, old, adv = (torch.randn(6, 5, generator=g) for _ in range(3))
    mask = (torch.arange(5)[None, :] < torch.tensor([5, 1, 3, 2, 5, 4])[:, None]).float()
    whole, _, _ = policy_loss(lp, old, adv, mask, 0.2)
    n = mask.sum()
    parts = sum(policy_loss(lp[i:i + 2], old[i:i + 2], adv[i:i + 2], mask[i:i + 2], 0.2, n)[0] for i in (0, 2, 4))
    assert parts == pytest.approx(whole.item(), abs=1e-6)
    means = sum(policy_loss(lp[i:i + 2], old[i:i + 2], adv[i:i + 2], mask[i:i + 2], 0.2)[0] for i in (0, 2, 4)) / 3
    assert abs(means.item() - whole.item()) > 1e-3  # a mean of micro-batch means is another number here
    v, ret = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    whole_v, _ = value_loss(v, old, ret, mask, 0.2)
    parts_v = sum(value_loss(v[i:i + 3], old[i:i + 3], ret[i:i + 3], mask[i:i + 3], 0.2, n)[0] for i in (0, 3))
    assert parts_v == pytest.approx(whole_v.item(), abs=1e-6) and whole_v == pytest.approx(
        0.5 * masked_mean(torch.maximum((v - ret) ** 2, (old + (v - old).clamp(-0.2, 0.2) - ret) ** 2), mask).item())


# --- every scoring forward: one micro-batch at a time, no KV cache --------------------------------

class ForwardSpy:
    """Largest batch a module's forward saw, and the use_cache each call passed."""

    def __init__(self, module):
        self.rows, self.use_cache = [], []
        module.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.rows.append(ids.shape[0])
        self.use_cache.append(kwargs.get("use_cache"))


def _packed(n: int, seed: int = 0):
    from tlcr_ray.rl.batch import pack

    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, 9, (2, n), generator=g).tolist()
    ids = lambda k: torch.randint(100, 3000, (k,), generator=g).tolist()  # noqa: E731
    return pack([ids(k) for k in lens[0]], [ids(k) for k in lens[1]], pad_id=0)


def test_reference_log_probs_run_one_micro_batch_at_a_time_without_cache(tiny_model_dir):
    from tlcr_ray.models import load_policy
    from tlcr_ray.rl.batch import policy_logprobs

    model = load_policy(tiny_model_dir).eval()
    spy = ForwardSpy(model)
    packed = _packed(11)
    whole = policy_logprobs(model, packed)
    assert spy.rows == [11]
    spy.rows.clear()
    parts = policy_logprobs(model, packed, micro_batch_size=3)
    assert spy.rows == [3, 3, 3, 2] and set(spy.use_cache) == {False}
    assert torch.allclose(parts, whole, atol=1e-5)


def test_reward_scoring_and_the_http_scorer_run_one_micro_batch_at_a_time_without_cache(head_models, tokenizer):
    from tlcr_ray.config import RewardConfig
    from tlcr_ray.models import load_head_model
    from tlcr_ray.rl.rewards import score_packed
    from tlcr_ray.rl.text_scoring import encode_items, response_probabilities

    packed = _packed(10, seed=1)
    for kind, mode in (("disc", "continuous"), ("rm", "sequence")):
        model = load_head_model(head_models[kind]).eval()
        spy = ForwardSpy(model.backbone)
        whole = score_packed(model, packed, RewardConfig(mode=mode))
        parts = score_packed(model, packed, RewardConfig(mode=mode), micro_batch_size=4)
        assert spy.rows == [10, 4, 4, 2] and set(spy.use_cache) == {False}
        for key in whole:
            assert torch.allclose(parts[key], whole[key], atol=1e-5), key
    disc = load_head_model(head_models["disc"]).eval()
    spy = ForwardSpy(disc.backbone)
    encoded = encode_items(tokenizer, [("\n\nHuman: hi\n\nAssistant:", " Hello there " * k) for k in range(1, 8)])
    whole, parts = (response_probabilities(disc, encoded, tokenizer.pad_token_id, size) for size in (None, 2))
    assert spy.rows == [7, 2, 2, 2, 1] and set(spy.use_cache) == {False}
    assert all(torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-5) for a, b in zip(whole, parts))


def test_a_scoring_calls_activations_do_not_grow_with_the_batch(head_models):
    """Peak bytes held by the backbone's output tensors during one call: the largest hidden state any
    forward returned is one micro-batch's, whatever the batch (the memory the plan counts per forward)."""
    from tlcr_ray.models import load_head_model
    from tlcr_ray.rl.rewards import discriminator_probs

    disc = load_head_model(head_models["disc"]).eval()
    peaks = []
    disc.backbone.register_forward_hook(lambda m, a, out: peaks.append(out.last_hidden_state.nbytes))
    for n in (4, 16, 64):
        peaks.clear()
        packed = _packed(n, seed=n)
        discriminator_probs(disc, packed.input_ids, packed.attention_mask, packed.prompt_len, packed.response_mask,
                            micro_batch_size=4)
        seq = packed.input_ids.shape[1]
        assert max(peaks) <= 4 * seq * disc.config.hidden_size * 4  # one 4-row micro-batch, fp32


# --- a frozen model waits in host RAM between calls ------------------------------------------------

class Recorder(torch.nn.Module):
    """Records its moves; a move to a GPU is only recorded (none here), one to the CPU also done."""

    def __init__(self, log):
        super().__init__()
        self.log, self.w = log, torch.nn.Parameter(torch.zeros(1))

    def to(self, *args, **kwargs):
        device = torch.device(args[0])
        self.log.append(f"to {device.type}")
        return super().to(*args, **kwargs) if device.type == "cpu" else self

    def forward(self, x):
        self.log.append("forward")
        return x + self.w


@pytest.mark.parametrize("offload, expected", [(True, ["to cuda", "forward", "to cpu"]), (False, ["forward"])])
def test_resident_moves_the_model_to_the_device_for_the_block_and_back_after(offload, expected):
    from tlcr_ray.models import resident

    log = []
    model = Recorder(log)
    with resident(model, torch.device("cuda"), offload):
        model(torch.ones(1))
    assert log == expected
    log.clear()
    with pytest.raises(RuntimeError), resident(model, "cuda", offload):
        raise RuntimeError("a failed forward still sends the model back")
    assert log == (["to cuda", "to cpu"] if offload else [])
