"""tlcr-ray: Token-Level Continuous Reward RLHF (arXiv 2407.16574).

The pure library, in pipeline order: `data` (pairs, splits, tokenization) -> `labeling` (revisers,
Levenshtein labels) -> `models` -> `training` (supervised stages) -> `rl` (PPO, rewards, rollout
backends) -> `eval` (held-out accuracy, the Fig. 6 table, benchmarks, report). It never imports Ray;
the Ray layers live in the sibling packages `actors` and `serve`, and only `cli` (lazily) and
`local_ray` (inside its functions) reach them.
"""

__version__ = "0.1.0"
