"""tlcr-ray: Token-Level Continuous Reward RLHF (arXiv 2407.16574).

The pure library: data, revision, Levenshtein labels, models, rewards and PPO math. It never
imports Ray; the Ray layers live in the sibling packages `actors` and `serve`.
"""
import os as _os
import sys as _sys

__version__ = "0.1.0"

# DeepSpeed JIT-compiles its CPU shared-memory comm op on first use (~60 s). Keeping the build next
# to the interpreter (the venv, where `make` pre-builds it) means every process of every stage and
# every Ray worker finds it compiled, instead of racing to build it into ~/.cache under a file lock.
_os.environ.setdefault("TORCH_EXTENSIONS_DIR", _os.path.join(_sys.prefix, "torch_extensions"))
