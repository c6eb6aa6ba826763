"""The phase changes of a colocated PPO step (ppo.colocate all), in order, each logged.

    generate ─► rollout.sleep ─► score / reference / learner evaluate ─► learner.reload_states ─► train
             ─► learner.offload_states ─► rollout.wake_up ─► weight sync ─► (next step's generate)

The engines hand the GPU over while the scorers and the learner run, and the learner's optimizer
states leave it while the engines hold their KV cache. A checkpoint reloads the learner's states
around the save. Each hook is one call per actor; what every actor did (or why it did nothing, e.g.
on CPU) goes to the run's metrics.jsonl as `{"event": "phase", ...}` rows, in the order they ran.
With ppo.colocate none, `PhaseHooks.none()` makes every hook a no-op that logs nothing.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable


class PhaseHooks:
    def __init__(self, groups, record: Callable[..., None] | None):
        """`groups`: the live `ActorGroups`; `record(**row)`: where event rows go (None: hooks disabled)."""
        self.groups, self.record = groups, record
        self.step = 0

    @classmethod
    def for_groups(cls, groups, metrics) -> "PhaseHooks":
        hooks = cls(groups, metrics.event if groups.colocated else None)
        for e in groups.startup_events:  # what ActorGroups ran while starting, logged as step 0's
            hooks._log(e["group"], e["hook"], e["results"], 0.0)
        return hooks

    def _log(self, group: str, hook: str, results: list[dict], seconds: float) -> None:
        self.record(event="phase", ppo_step=self.step, group=group, hook=hook, seconds=round(seconds, 4),
                    applied=[bool(r.get("applied")) for r in results],
                    reason=sorted({r.get("reason", "") for r in results}))

    def _run(self, group: str, hook: str, refs_of: Callable[[], list]) -> float:
        if self.record is None:
            return 0.0
        from actors.groups import get_all

        start = time.perf_counter()
        results = get_all(refs_of())
        seconds = time.perf_counter() - start
        self._log(group, hook, results, seconds)
        return seconds

    def start(self) -> float:
        """Before the first step: the state every step starts from (learner offloaded, engines awake)."""
        return self.after_train()

    def after_generate(self) -> float:
        return self._run("rollout", "sleep", lambda: [r.sleep.remote() for r in self.groups.rollouts])

    def before_train(self) -> float:
        return self._run("learner", "reload_states", self.groups.learners.reload_states)

    def after_train(self) -> float:
        return (self._run("learner", "offload_states", self.groups.learners.offload_states)
                + self._run("rollout", "wake_up", lambda: [r.wake_up.remote() for r in self.groups.rollouts]))

    @contextmanager
    def learner_resident(self):
        """A checkpoint or export reads every state of the learner: reloaded for it, offloaded again after."""
        self._run("learner", "reload_states", self.groups.learners.reload_states)
        yield
        self._run("learner", "offload_states", self.groups.learners.offload_states)
