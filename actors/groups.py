"""The PPO actor groups: rollout, reward, reference and learner actors on the placement groups that
`tlcr_ray.placement` lays out (ppo.colocate none: one per group, the learner's first and STRICT_PACK
when it fits a node; all: one shared group), created together and shut down together (a lost actor
means the whole set is recreated and the run resumes from its last checkpoint)."""
from __future__ import annotations

import os
import time

import ray
from ray.util.placement_group import placement_group_table
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.learner import LearnerGroup
from actors.placement import create_placement_groups, node_resources, remove_all
from actors.reference import Reference
from actors.reward import RewardScorer
from actors.rollout import Rollout
from tlcr_ray.config import Config
from tlcr_ray.placement import ActorSlot, ppo_placement
from tlcr_ray.rl.minibatches import fuses_evaluation
from tlcr_ray.rl.rollout import engine_kwargs_of, resolve_backend
from tlcr_ray.oom import TEST_OOM_ENV
from tlcr_ray.rl.weight_sync import shares_learner_gpu, weight_sync_method


class ActorGroups:
    """Rollout, reward, reference and learner actors on their placement groups (`tlcr_ray.placement`)."""

    def __init__(self, cfg: Config, policy_dir: str, rollout_dir: str, reward_dir: str, attempt: int = 0):
        ppo = cfg.ppo
        self.colocated = ppo.colocate == "all"
        self.layout = ppo_placement(ppo, resolve_backend(ppo.rollout_backend), node_resources())
        self.pgs = create_placement_groups(self.layout.groups, ppo.placement_wait_s)
        self.startup_events: list[dict] = []  # ppo.colocate all: the phase hooks run while starting
        self.rollouts, self.scorers, self.references, self.learners = [], [], [], None
        try:
            self._start(cfg, policy_dir, rollout_dir, reward_dir, attempt)
        except BaseException:
            # The caller never gets this object: free what it holds, or the retry waits for it forever.
            self.shutdown()
            raise

    def _start(self, cfg: Config, policy_dir: str, rollout_dir: str, reward_dir: str, attempt: int) -> None:
        ppo = cfg.ppo

        env_vars = {}
        if ppo.threads_per_actor:  # Ray keeps an OMP_NUM_THREADS that is already set
            env_vars["OMP_NUM_THREADS"] = str(ppo.threads_per_actor)
        if TEST_OOM_ENV in os.environ:  # the OOM tests' hook (tlcr_ray.oom) reaches the actors this way
            env_vars[TEST_OOM_ENV] = os.environ[TEST_OOM_ENV]
        # Merged into the job's runtime env (with each group's wait policy and threads, below).

        def opts(slot: ActorSlot) -> dict:
            # Named per attempt so a recreated group never collides with a dying one.
            return {"name": f"tlcr-ppo-{slot.group}-{slot.index}-a{attempt}", "num_cpus": slot.num_cpus,
                    "num_gpus": slot.num_gpus, "resources": slot.resources or None,
                    "runtime_env": {"env_vars": {**env_vars, **group_env(ppo, slot.group), **slot.env_vars}},
                    "scheduling_strategy": PlacementGroupSchedulingStrategy(
                        self.pgs[slot.placement_group], placement_group_bundle_index=slot.bundle)}

        dtype = cfg.model.dtype
        self.rollouts = [Rollout.options(**opts(s)).remote(
            rollout_dir, ppo.rollout_backend, {**engine_kwargs_of(cfg), **s.engine_kwargs, "seed": ppo.seed + s.index})
            for s in self.layout.of("rollout")]
        if self.colocated:
            # vLLM sizes its memory from what is free when it starts: the engines start (and fall asleep)
            # before the learner and the scorers take their share of the same GPUs.
            get_all([r.pid.remote() for r in self.rollouts])
            self.startup_events.append({"group": "rollout", "hook": "sleep",
                                        "results": get_all([r.sleep.remote() for r in self.rollouts])})
        self.scorers = [RewardScorer.options(**opts(s)).remote(reward_dir, cfg.reward, dtype,
                                                                ppo.forward_micro_batch_size, ppo.offload_reward)
                        for s in self.layout.of("reward")]
        self.references = [Reference.options(**opts(s)).remote(policy_dir, dtype, ppo.temperature,
                                                             ppo.forward_micro_batch_size, ppo.offload_reference)
                           for s in self.layout.of("reference")]
        # ppo.critic_init: reward -> the run's discriminator or sequence RM (whichever reward_dir is), head
        # weights included; policy -> the initial policy's backbone with a fresh head.
        critic_dir = reward_dir if ppo.critic_init == "reward" else policy_dir
        (learner_pg,) = {s.placement_group for s in self.layout.of("learner")}
        self.learners = LearnerGroup(policy_dir, ppo, dtype, self.pgs[learner_pg], name=f"tlcr-ppo-learner-a{attempt}",
                                     runtime_env={"env_vars": {**env_vars, **group_env(ppo, "learner")}},
                                     critic_dir=critic_dir)
        get_all(self.learners.ready)
        self.sync_method = self.choose_weight_sync(ppo)
        self.weight_update_info = self.connect_nccl_sync(ppo) if self.sync_method == "nccl" else None
        # Colocated, the engines stay asleep until the loop starts (`PhaseHooks.start`): a resumed run first
        # loads the learner's checkpoint into its resident states.

    def choose_weight_sync(self, ppo) -> str:
        """ppo.weight_sync against where the actors landed (`tlcr_ray.rl.weight_sync.weight_sync_method`)."""
        learner_at = self.learners.placement_info()
        rollout_at = get_all([r.placement_info.remote() for r in self.rollouts])
        return weight_sync_method(ppo.rollout_backend, ppo.learner.num_gpus > 0, self.colocated,
                                  requested=ppo.weight_sync,
                                  same_node=all(node == learner_at[0][0] for node, _ in rollout_at),
                                  shares_gpu=shares_learner_gpu(learner_at, rollout_at))

    def connect_nccl_sync(self, ppo) -> dict:
        """One NCCL group: learner rank 0 is rank 0, rollout i's TP workers follow it. Returns the
        (fixed) names/dtypes/shapes every broadcast round sends."""
        tp = ppo.vllm_tensor_parallel
        world_size = 1 + len(self.rollouts) * tp
        address = self.learners.node_ips[0]
        port = ray.get(self.learners.workers[0].free_port.remote())
        info = get_all(self.learners.weight_update_info())[0]
        # Both sides block inside the group's init until all have joined: issue them together.
        get_all([r.init_weight_sync.remote(address, port, 1 + i * tp, world_size) for i, r in enumerate(self.rollouts)]
                + self.learners.init_weight_sender(address, port, world_size))
        return info

    def actors(self) -> dict[str, list]:
        return {"rollout": self.rollouts, "reward": self.scorers, "reference": self.references,
                "learner": self.learners.workers if self.learners else []}

    def shutdown(self) -> None:
        if self.learners:  # a killed learner keeps its reused /dev/shm bucket until the next sync sweeps it
            ray.wait(self.learners.release_shm_files(), num_returns=len(self.learners.workers), timeout=10)
        for group in self.actors().values():
            for actor in group:
                ray.kill(actor, no_restart=True)
        remove_all(self.pgs)
        # Removal is asynchronous: a next run in this driver creates PGs of the same names.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(
                placement_group_table(pg).get("state") not in ("REMOVED", None) for pg in self.pgs.values()):
            time.sleep(0.2)


def group_env(ppo, group: str) -> dict[str, str]:
    """The environment a group's actors start with: its OpenMP wait policy and, with ppo.<group>.threads,
    its thread count (over ppo.threads_per_actor)."""
    threads = getattr(ppo, group).threads
    return {**wait_policy(ppo, group), **({"OMP_NUM_THREADS": str(threads)} if threads else {})}


def wait_policy(ppo, group: str) -> dict[str, str]:
    """OpenMP's wait policy of a group's actors: an OMP_WAIT_POLICY in the environment, else PASSIVE (idle
    threads sleep at once) for the groups whose forwards run side by side on the same cores (reward,
    reference, and the learner's evaluation: a co-tenant's spinning threads slowed the busy one about 4x
    on a loaded 2-core machine), and OpenMP's own default (spin briefly, then sleep) for the groups that
    compute alone: the rollout, whose decoding runs thousands of short parallel regions per token, each
    paying PASSIVE's wake-up (generate ran 1.27x slower under it: SmolLM2-135M, 64 tokens, 2 cores, 9.8 s
    vs 7.7 s), and the learner when it evaluates nothing (ppo.fuse_evaluation on a one-pass update;
    forward+backward+AdamW of SmolLM2-135M ran ~1.1x faster without PASSIVE)."""
    if "OMP_WAIT_POLICY" in os.environ:
        return {"OMP_WAIT_POLICY": os.environ["OMP_WAIT_POLICY"]}
    alone = group == "rollout" or (group == "learner" and fuses_evaluation(ppo, ppo.learner.num_actors))
    return {} if alone else {"OMP_WAIT_POLICY": "PASSIVE"}


def get_all(refs: list) -> list:
    """ray.get that raises as soon as ANY ref fails: a dead rank must not wait behind a peer that is
    blocked in a collective with it."""
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        ray.get(ready)
    return ray.get(refs)
