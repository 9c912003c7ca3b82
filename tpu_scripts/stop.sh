#!/usr/bin/env bash
# Usage: tpu_scripts/stop.sh --name NAME --zone ZONE [--project PROJECT] --log LOG
#            [--worker all|N] [--remote-dir DIR] [--dry-run]
#
# Send SIGTERM to a run started by launch.sh (its whole process group, on every
# worker). `dma` saves a checkpoint at the next step and exits; launching the same
# command again resumes from it.
#
#   --log LOG        the log name given to launch.sh (default there: the stage name)
#   --worker all|N   workers to signal (default all)
#   --remote-dir DIR where install.sh put the code (default dma_jax)
#   --dry-run        print the gcloud command instead of running it
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

LOG=""
WORKER="all"
normalize_args "$@"
set -- "${ARGS[@]+"${ARGS[@]}"}"
while (( $# )); do
  case $1 in
    --log) LOG=$(take_value "$1" "${2-}" "$#"); shift 2 ;;
    --worker) WORKER=$(take_value "$1" "${2-}" "$#"); shift 2 ;;
    --remote-dir) REMOTE_DIR=$(take_value "$1" "${2-}" "$#"); shift 2 ;;
    *) common_flag "$@"; shift "$CONSUMED" ;;
  esac
done
location_flags
check_remote_dir
require --log "$LOG"
[[ "$LOG" =~ ^[A-Za-z0-9._-]+$ ]] || die "--log '$LOG' must be letters, digits or '._-'"

DIR=$(quote "$REMOTE_DIR")
on_workers "$WORKER" "kill -TERM -- -\"\$(cat $DIR/logs/$LOG.pid)\" && echo \"\$(hostname): sent SIGTERM to $LOG\""
