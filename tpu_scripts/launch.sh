#!/usr/bin/env bash
# Usage: tpu_scripts/launch.sh --name NAME --zone ZONE [--project PROJECT]
#            [--worker all|N] [--remote-dir DIR] [--log LOG] [--env KEY=VALUE]...
#            [--foreground] [--dry-run] -- STAGE [DMA ARGS...]
#
# Run `dma STAGE ...` on every worker at once (a pod slice needs one process per
# host; each sees all devices of the slice). The words after `--` are passed to
# ~/DIR/.venv/bin/dma unchanged, e.g.
#   tpu_scripts/launch.sh --name my-tpu --zone us-west4-a -- pretrain --config configs/x.yaml --model proxy
#
# By default the run is detached (setsid nohup, stdin from /dev/null), so it
# survives the ssh session: output goes to ~/DIR/logs/LOG.log and the process
# group id to ~/DIR/logs/LOG.pid on each worker. Follow it with logs.sh, stop it
# (SIGTERM: `dma` saves a checkpoint, re-running resumes) with stop.sh.
#
#   --worker all|N   workers to run on (default all)
#   --remote-dir DIR where install.sh put the code (default dma_jax)
#   --log LOG        log name, letters/digits/._- (default: the stage name)
#   --env KEY=VALUE  environment variable for the run; repeatable
#                    (e.g. --env DMA_JAX_CACHE=/tmp/xla-cache)
#   --foreground     stay attached and stream the output (also written to the log)
#   --dry-run        print the gcloud command instead of running it
#
# Multi-host: every run gets DMA_DISTRIBUTED=auto, so `dma` calls
# jax.distributed.initialize() without arguments and JAX finds the coordinator,
# the number of processes and this worker's id in the TPU VM's metadata (one
# host: one process). DMA_COORDINATOR / DMA_NUM_PROCESSES / DMA_PROCESS_ID are
# for other clusters; --env DMA_DISTRIBUTED=off turns it off.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

WORKER="all"
LOG=""
ENVS=()
FOREGROUND=0
DMA_ARGS=()
normalize_args "$@"
set -- "${ARGS[@]+"${ARGS[@]}"}"
while (( $# )); do
  case $1 in
    --worker) WORKER=$(take_value "$1" "${2-}" "$#"); shift 2 ;;
    --remote-dir) REMOTE_DIR=$(take_value "$1" "${2-}" "$#"); shift 2 ;;
    --log) LOG=$(take_value "$1" "${2-}" "$#"); shift 2 ;;
    --env)
      ENVS+=("$(take_value "$1" "${2-}" "$#")")
      [[ "${ENVS[-1]}" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env '${ENVS[-1]}' is not KEY=VALUE"
      shift 2 ;;
    --foreground) FOREGROUND=1; shift ;;
    --) shift; DMA_ARGS=("$@"); break ;;
    *) common_flag "$@"; shift "$CONSUMED" ;;
  esac
done
location_flags
check_remote_dir
(( ${#DMA_ARGS[@]} )) || die "missing the dma stage to run: add -- STAGE [ARGS...] (e.g. -- pretrain --model proxy)"
if [[ -z "$LOG" ]]; then  # the stage: the first word that is not a global flag such as -v
  for word in "${DMA_ARGS[@]}"; do
    if [[ "$word" != -* ]]; then LOG=$word; break; fi
  done
  [[ -n "$LOG" ]] || die "no dma stage after -- (e.g. -- pretrain --model proxy)"
fi
[[ "$LOG" =~ ^[A-Za-z0-9._-]+$ ]] || die "--log '$LOG' must be letters, digits or '._-'"

DIR=$(quote "$REMOTE_DIR")
# Later assignments win, so --env DMA_DISTRIBUTED=off overrides the default.
CMD="env $(quote DMA_DISTRIBUTED=auto "${ENVS[@]+"${ENVS[@]}"}") .venv/bin/dma $(quote "${DMA_ARGS[@]}")"
REMOTE="cd $DIR && mkdir -p logs"
if (( FOREGROUND )); then
  REMOTE="set -o pipefail && $REMOTE && $CMD 2>&1 | tee logs/$LOG.log"
else
  REMOTE+=" && { setsid nohup $CMD > logs/$LOG.log 2>&1 < /dev/null & echo \$! > logs/$LOG.pid; }"
  REMOTE+=" && echo \"\$(hostname): started pid \$(cat logs/$LOG.pid), log ~/$DIR/logs/$LOG.log\""
fi
on_workers "$WORKER" "$REMOTE"
