"""The PPO actor groups: rollout, reward, reference and learner actors, each group on its own PACKed
placement group, created together and shut down together (a lost actor means the whole set is
recreated and the run resumes from its last checkpoint)."""
from __future__ import annotations

import os
import time

import ray
from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.learner import LearnerGroup
from actors.reference import Reference
from actors.reward import RewardScorer
from actors.rollout import Rollout
from tlcr_ray.config import Config
from tlcr_ray.oom import TEST_OOM_ENV
from tlcr_ray.rl.weight_sync import weight_sync_method


def _bundle(res) -> dict:
    bundle = {"CPU": res.num_cpus, **res.resources}
    if res.num_gpus:
        bundle["GPU"] = res.num_gpus
    return bundle


class ActorGroups:
    """Rollout, reward, reference and learner actors, each group on its own PACKed placement group."""

    def __init__(self, cfg: Config, policy_dir: str, rollout_dir: str, reward_dir: str, attempt: int = 0):
        ppo = cfg.ppo
        self.pgs = {}
        for name in ("rollout", "reward", "reference", "learner"):
            res = getattr(ppo, name)
            pg = placement_group([_bundle(res)] * res.num_actors, strategy="PACK", name=f"tlcr-ppo-{name}")
            if not pg.wait(timeout_seconds=300):
                remove_placement_group(pg)
                raise RuntimeError(f"ppo.{name}: cannot place {res.num_actors} x {_bundle(res)} on this cluster "
                                   f"(available: {ray.available_resources()})")
            self.pgs[name] = pg

        # Idle OpenMP threads sleep instead of spinning: the actors share cores, and spinning threads of
        # an idle actor (or of a co-tenant) slowed the busy one about 4x on a loaded 2-core machine.
        env_vars = {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
        if ppo.threads_per_actor:  # Ray keeps an OMP_NUM_THREADS that is already set
            env_vars["OMP_NUM_THREADS"] = str(ppo.threads_per_actor)
        if TEST_OOM_ENV in os.environ:  # the OOM tests' hook (tlcr_ray.oom) reaches the actors this way
            env_vars[TEST_OOM_ENV] = os.environ[TEST_OOM_ENV]
        runtime_env = {"env_vars": env_vars}  # merged into the job's runtime env

        def opts(name: str, i: int) -> dict:
            res = getattr(ppo, name)
            # Named per attempt so a recreated group never collides with a dying one.
            return {"name": f"tlcr-ppo-{name}-{i}-a{attempt}", "num_cpus": res.num_cpus, "num_gpus": res.num_gpus,
                    "resources": res.resources or None, "runtime_env": runtime_env,
                    "scheduling_strategy": PlacementGroupSchedulingStrategy(self.pgs[name], placement_group_bundle_index=i)}

        dtype = cfg.model.dtype
        engine_kwargs = {"dtype": dtype, "gpu_memory_utilization": ppo.vllm_memory_utilization,
                         "tensor_parallel_size": ppo.vllm_tensor_parallel, "kv_cache_gib": ppo.vllm_kv_cache_gib,
                         # +1: scoring a full prompt + response still asks vLLM for one new token.
                         "max_model_len": cfg.model.max_prompt_len + cfg.model.max_response_len + 1}
        self.rollouts = [Rollout.options(**opts("rollout", i)).remote(
            rollout_dir, ppo.rollout_backend, {**engine_kwargs, "seed": ppo.seed + i})
            for i in range(ppo.rollout.num_actors)]
        self.scorers = [RewardScorer.options(**opts("reward", i)).remote(reward_dir, cfg.reward, dtype)
                        for i in range(ppo.reward.num_actors)]
        self.references = [Reference.options(**opts("reference", i)).remote(policy_dir, dtype, ppo.temperature)
                           for i in range(ppo.reference.num_actors)]
        # ppo.critic_init: reward -> the run's discriminator or sequence RM (whichever reward_dir is), head
        # weights included; policy -> the initial policy's backbone with a fresh head.
        critic_dir = reward_dir if ppo.critic_init == "reward" else policy_dir
        self.learners = LearnerGroup(policy_dir, ppo, dtype, self.pgs["learner"], name=f"tlcr-ppo-learner-a{attempt}",
                                     runtime_env=runtime_env, critic_dir=critic_dir)
        get_all(self.learners.ready)
        self.sync_method = weight_sync_method(ppo.rollout_backend, ppo.learner.num_gpus > 0)
        self.weight_update_info = self.connect_nccl_sync(ppo) if self.sync_method == "nccl" else None

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
                "learner": self.learners.workers}

    def shutdown(self) -> None:
        for group in self.actors().values():
            for actor in group:
                ray.kill(actor, no_restart=True)
        for pg in self.pgs.values():
            remove_placement_group(pg)
        # Removal is asynchronous: a next run in this driver creates PGs of the same names.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(
                placement_group_table(pg).get("state") not in ("REMOVED", None) for pg in self.pgs.values()):
            time.sleep(0.2)


def get_all(refs: list) -> list:
    """ray.get that raises as soon as ANY ref fails: a dead rank must not wait behind a peer that is
    blocked in a collective with it."""
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        ray.get(ready)
    return ray.get(refs)
