"""Decisions of the distributed PPO plumbing that a CPU machine can check without the devices:
how learner ranks meet (file:// vs TCP) and how weights reach the rollout engines (object store vs
NCCL), plus the NCCL payload up to the device boundary. The NCCL broadcast itself needs CUDA and
is not run here.

    .venv/bin/python -m pytest tests/integration/test_ppo_distributed.py -q
"""
from __future__ import annotations

import socket

import pytest

from tlcr_ray.config import PPOConfig
from tlcr_ray.rl.rendezvous import free_port, needs_tcp_rendezvous, rendezvous_init_method


def test_one_cpu_node_meets_through_a_file():
    assert not needs_tcp_rendezvous(["127.0.0.1", "127.0.0.1"], on_gpu=False)
    assert rendezvous_init_method(["127.0.0.1"] * 2, False, "/tmp/rdzv-x") == "file:///tmp/rdzv-x"


def test_ranks_on_several_nodes_or_gpus_meet_over_tcp_at_rank_0():
    assert rendezvous_init_method(["10.0.0.5", "10.0.0.7"], False, "/tmp/rdzv-x", 29511) == "tcp://10.0.0.5:29511"
    assert rendezvous_init_method(["10.0.0.7", "10.0.0.5", "10.0.0.7"], False, "/tmp/r", 1) == "tcp://10.0.0.7:1"
    assert rendezvous_init_method(["10.0.0.5"], True, "/tmp/rdzv-x", 29511) == "tcp://10.0.0.5:29511"
    assert rendezvous_init_method(["fd00::1", "fd00::2"], False, "/tmp/r", 7) == "tcp://[fd00::1]:7"
    with pytest.raises(ValueError, match="port"):
        rendezvous_init_method(["10.0.0.5", "10.0.0.7"], False, "/tmp/rdzv-x")


def test_free_port_can_be_bound():
    port = free_port("127.0.0.1")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


@pytest.fixture(scope="module")
def learner(tiny_model_dir, learner_rdzv):
    from tlcr_ray.rl.learner import PPOLearner

    cfg = PPOConfig(mini_batch_size=2, zero_stage=2)
    return PPOLearner(tiny_model_dir, cfg, rank=0, world_size=1, init_method=learner_rdzv)


def test_nccl_payload_describes_what_the_cpu_path_loads(learner):
    """The broadcast's metadata (sent once) names exactly the tensors, dtypes and shapes the
    object-store path hands to vLLM, tied lm_head included, in the sender's order; and vLLM's NCCL
    receiver accepts it."""
    from tlcr_ray.rl.weight_sync import with_tied_lm_head

    state = learner.full_state_dict()
    expected = with_tied_lm_head(state, learner.tie_word_embeddings)
    info = learner.weight_update_info()
    assert learner.tie_word_embeddings and "lm_head.weight" in info["names"]
    assert info["names"] == list(expected)
    assert info["shapes"] == [list(t.shape) for t in expected.values()]
    assert set(info["dtype_names"]) == {"float32"}
    pytest.importorskip("vllm")
    from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferEngine as Engine

    update = Engine.update_info_cls(**info)
    assert update.names == info["names"]
