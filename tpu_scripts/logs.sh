#!/usr/bin/env bash
# Usage: tpu_scripts/logs.sh --name NAME --zone ZONE [--project PROJECT] --log LOG
#            [--worker N|all] [--lines N] [--follow] [--dry-run]
#
# Show the end of a run's log (written by launch.sh to ~/DIR/logs/LOG.log) and
# whether the run is still alive.
#
#   --log LOG        the log name given to launch.sh (default there: the stage name)
#   --worker N|all   worker(s) to read (default 0: the one that writes outputs)
#   --lines N        lines to show (default 40)
#   --follow         keep following the log (Ctrl-C to stop; the run goes on)
#   --remote-dir DIR where install.sh put the code (default dma_jax)
#   --dry-run        print the gcloud command instead of running it
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

LOG=""
WORKER="0"
LINES="40"
FOLLOW=""
normalize_args "$@"
set -- "${ARGS[@]+"${ARGS[@]}"}"
while (( $# )); do
  case $1 in
    --log) LOG=$(take_value "$1" "${2-}" "$#"); shift 2 ;;
    --worker) WORKER=$(take_value "$1" "${2-}" "$#"); shift 2 ;;
    --lines) LINES=$(take_value "$1" "${2-}" "$#"); shift 2 ;;
    --follow) FOLLOW=" -f"; shift ;;
    --remote-dir) REMOTE_DIR=$(take_value "$1" "${2-}" "$#"); shift 2 ;;
    *) common_flag "$@"; shift "$CONSUMED" ;;
  esac
done
location_flags
check_remote_dir
require --log "$LOG"
[[ "$LOG" =~ ^[A-Za-z0-9._-]+$ ]] || die "--log '$LOG' must be letters, digits or '._-'"
[[ "$LINES" =~ ^[0-9]+$ ]] || die "--lines '$LINES' is not a number"

DIR=$(quote "$REMOTE_DIR")
REMOTE="cd $DIR/logs && { if kill -0 \"\$(cat $LOG.pid)\" 2>/dev/null;"
REMOTE+=" then echo \"\$(hostname): $LOG running\"; else echo \"\$(hostname): $LOG not running\"; fi; }"
REMOTE+=" && tail -n $LINES$FOLLOW $LOG.log"
on_workers "$WORKER" "$REMOTE"
