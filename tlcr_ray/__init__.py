"""tlcr-ray: Token-Level Continuous Reward RLHF (arXiv 2407.16574).

The pure library: data, revision, Levenshtein labels, models, rewards and PPO math. It never
imports Ray; the Ray layers live in the sibling packages `actors` and `serve`.
"""
__version__ = "0.1.0"
