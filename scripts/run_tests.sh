#!/usr/bin/env bash
# Runs the suite; in CI (as root, where the kernel allows it) inside a loopback-only network
# namespace so that nothing a test starts can listen on, or reach, anything but 127.0.0.1.
set -uo pipefail
VENV=${VENV:-.venv}
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}   # one mode for every cluster and client a test starts
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/$VENV/torch_extensions}  # DeepSpeed JIT ops compile once
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONUNBUFFERED=1
# The slowest tests are listed at the end, so that the suite's time can be kept in check from any CI log.
cmd=("$VENV/bin/python" -m pytest --durations=30 "$@")
if [ "${CI:-}" = "true" ] && [ "$(id -u)" = "0" ] && unshare -n true 2>/dev/null; then
  echo "running the tests in a loopback-only network namespace"
  unshare -n bash -c 'ip link set lo up && exec "$@"' _ "${cmd[@]}"
else
  "${cmd[@]}"
fi
rc=$?
# pytest exits 5 when it collected nothing: that is a failure of the suite, not a pass.
exit $rc
