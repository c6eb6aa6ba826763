#!/usr/bin/env bash
# Submit one tlcr stage to a Ray cluster as a Ray job (`ray job submit` with deploy/runtime_env.yaml).
#
#   deploy/submit.sh STAGE [tlcr arguments...]
#
#   deploy/submit.sh label      --config configs/a100-7b.yaml
#   deploy/submit.sh sft        --config configs/a100-7b.yaml
#   deploy/submit.sh train-disc --config configs/a100-7b.yaml
#   deploy/submit.sh train-rm   --config configs/a100-7b.yaml
#   deploy/submit.sh ppo        --config configs/a100-7b.yaml --set reward.mode=continuous
#   deploy/submit.sh eval disc  --config configs/a100-7b.yaml
#   deploy/submit.sh pipeline   --config configs/a100-7b.yaml
#
# Run it from the repository root (the working directory is uploaded with the job). Environment:
#   RAY_ADDRESS        the cluster's job API (default http://127.0.0.1:8265: `ray dashboard cluster.yaml`
#                      or `kubectl port-forward svc/<cluster>-head-svc 8265` puts it there)
#   RAY_AUTH_MODE      default token; the token is read from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or
#                      ~/.ray/auth_token (Ray's own lookup order)
#   TLCR_RUNTIME_ENV   runtime_env file (default deploy/runtime_env.yaml)
#   TLCR_SUBMIT_FLAGS  extra `ray job submit` flags, e.g. "--no-wait" or "--entrypoint-num-cpus 1"
#   TLCR_DRY_RUN=1     print the command instead of running it
#
# Exit status: ray job submit's (0 when the job succeeded; with --no-wait, when it was accepted).
set -euo pipefail

STAGES="label sft train-disc train-rm ppo eval pipeline"
usage() { sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; }

if [ $# -lt 1 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
  usage
  exit 2
fi
stage=$1
shift
case " $STAGES " in
  *" $stage "*) ;;
  *) echo "submit.sh: unknown stage '$stage' (one of: $STAGES)" >&2; exit 2 ;;
esac

runtime_env=${TLCR_RUNTIME_ENV:-deploy/runtime_env.yaml}
if [ ! -f "$runtime_env" ]; then
  echo "submit.sh: runtime_env file not found: $runtime_env (run from the repository root)" >&2
  exit 2
fi
export RAY_ADDRESS=${RAY_ADDRESS:-http://127.0.0.1:8265}
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}

# Letters, digits, dashes: a submission id is also a log/file name on the head node.
submission_id="tlcr-${stage}-$(date -u +%Y%m%d-%H%M%S)-$$"
# shellcheck disable=SC2206  # TLCR_SUBMIT_FLAGS is a list of flags on purpose
extra_flags=(${TLCR_SUBMIT_FLAGS:-})
cmd=(ray job submit
  --address "$RAY_ADDRESS"
  --submission-id "$submission_id"
  --runtime-env "$runtime_env"
  --working-dir .
  "${extra_flags[@]}"
  -- python -m tlcr_ray.cli "$stage" "$@")

if [ "${TLCR_DRY_RUN:-0}" = "1" ]; then
  printf '%q ' "${cmd[@]}"
  echo
  exit 0
fi
echo "submit.sh: $stage -> $RAY_ADDRESS as $submission_id (auth: $RAY_AUTH_MODE)" >&2
exec "${cmd[@]}"
