#!/usr/bin/env bash
# Usage: tpu_scripts/gcs.sh --src SRC --dst DST [--cp] [--dry-run]
#        tpu_scripts/gcs.sh --src SRC --dst DST --name NAME --zone ZONE [--project PROJECT]
#            [--worker N|all] [--remote-dir DIR] [--cp] [--dry-run]
#
# Copy a directory to or from Google Cloud Storage with `gcloud storage rsync
# --recursive` (only new or changed files move; --cp: `gcloud storage cp --recursive`
# instead). One of SRC / DST must be a gs:// URL.
#
# Without --name it runs here (e.g. fetch a run's outputs from the bucket to this
# machine). With --name it runs on TPU workers over ssh, inside ~/DIR, so relative
# paths are relative to the checkout there (e.g. push runs/tpu to the bucket, or
# pull a prepared data dir from it). The TPU VM's service account needs access to
# the bucket.
#
#   --worker N|all   workers to run on (default 0; use all to pull inputs every
#                    worker needs)
#   --remote-dir DIR where install.sh put the code (default dma_jax)
#   --cp             copy everything (gcloud storage cp -r) instead of rsync
#   --dry-run        print the gcloud command instead of running it
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

SRC=""
DST=""
WORKER="0"
VERB=(rsync --recursive)
normalize_args "$@"
set -- "${ARGS[@]+"${ARGS[@]}"}"
while (( $# )); do
  case $1 in
    --src) SRC=$(take_value "$1" "${2-}" "$#"); shift 2 ;;
    --dst) DST=$(take_value "$1" "${2-}" "$#"); shift 2 ;;
    --worker) WORKER=$(take_value "$1" "${2-}" "$#"); shift 2 ;;
    --remote-dir) REMOTE_DIR=$(take_value "$1" "${2-}" "$#"); shift 2 ;;
    --cp) VERB=(cp --recursive); shift ;;
    *) common_flag "$@"; shift "$CONSUMED" ;;
  esac
done
require --src "$SRC"
require --dst "$DST"
[[ "$SRC" == gs://* || "$DST" == gs://* ]] || die "one of --src '$SRC' / --dst '$DST' must be a gs:// URL"

MKDIR=()
if [[ "$DST" != gs://* && "${VERB[0]}" == rsync ]]; then
  MKDIR=(mkdir -p "$DST")  # rsync wants an existing local destination
fi
if [[ -z "$NAME" && -z "$ZONE" ]]; then
  if (( ${#MKDIR[@]} )); then
    run "${MKDIR[@]}"
  fi
  run gcloud storage "${VERB[@]}" "$SRC" "$DST"
else
  location_flags
  check_remote_dir
  REMOTE="cd $(quote "$REMOTE_DIR")"
  if (( ${#MKDIR[@]} )); then
    REMOTE+=" && $(quote "${MKDIR[@]}")"
  fi
  on_workers "$WORKER" "$REMOTE && $(quote gcloud storage "${VERB[@]}" "$SRC" "$DST")"
fi
