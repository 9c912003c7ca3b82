#!/usr/bin/env bash
# Usage: tpu_scripts/delete.sh --name NAME --zone ZONE [--project PROJECT] [--yes] [--dry-run]
#
# Delete the TPU VM or pod slice (every worker's disk goes with it: copy results to
# GCS first with tpu_scripts/gcs.sh).
#
#   --yes       do not ask for confirmation (gcloud --quiet)
#   --dry-run   print the gcloud command instead of running it
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

QUIET=()
normalize_args "$@"
set -- "${ARGS[@]+"${ARGS[@]}"}"
while (( $# )); do
  case $1 in
    --yes) QUIET=(--quiet); shift ;;
    *) common_flag "$@"; shift "$CONSUMED" ;;
  esac
done
location_flags

run gcloud compute tpus tpu-vm delete "$NAME" "${LOCATION_FLAGS[@]}" "${QUIET[@]+"${QUIET[@]}"}"
