#!/usr/bin/env bash
# Usage: tpu_scripts/create.sh --name NAME --accelerator-type TYPE --zone ZONE
#            --runtime-version VERSION [--project PROJECT] [--spot | --preemptible]
#            [--gcloud-flag FLAG]... [--dry-run]
#
# Create a Cloud TPU VM (one host: v5litepod-8, v4-8) or a pod slice (several
# hosts: v4-32, v5litepod-16) with `gcloud compute tpus tpu-vm create`.
#
#   --name NAME                TPU name (also used by every other script)
#   --accelerator-type TYPE    e.g. v5litepod-8, v4-8, v4-32
#   --zone ZONE                e.g. us-west4-a (v5e), us-central2-b (v4)
#   --runtime-version VERSION  TPU software version, e.g. v2-alpha-tpuv5-lite (v5e),
#                              tpu-ubuntu2204-base (v4)
#   --project PROJECT          Google Cloud project (default: gcloud's configured one)
#   --spot / --preemptible     cheaper capacity that can be reclaimed at any time
#                              (`dma` saves a checkpoint on SIGTERM; re-run to resume)
#   --gcloud-flag FLAG         any other create flag, passed on verbatim; repeatable
#                              (e.g. --gcloud-flag=--scopes=cloud-platform)
#   --dry-run                  print the gcloud command instead of running it
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

ACCELERATOR=""
RUNTIME=""
CAPACITY=()
EXTRA=()
normalize_args "$@"
set -- "${ARGS[@]+"${ARGS[@]}"}"
while (( $# )); do
  case $1 in
    --accelerator-type) ACCELERATOR=$(take_value "$1" "${2-}" "$#"); shift 2 ;;
    --runtime-version) RUNTIME=$(take_value "$1" "${2-}" "$#"); shift 2 ;;
    --spot) CAPACITY+=(--spot); shift ;;
    --preemptible) CAPACITY+=(--preemptible); shift ;;
    --gcloud-flag)
      [[ "${2-}" == --?* ]] || die "--gcloud-flag needs a gcloud flag (--something) as its value"
      EXTRA+=("$2"); shift 2 ;;
    *) common_flag "$@"; shift "$CONSUMED" ;;
  esac
done
location_flags
require --accelerator-type "$ACCELERATOR"
require --runtime-version "$RUNTIME"
(( ${#CAPACITY[@]} <= 1 )) || die "--spot and --preemptible are exclusive"

run gcloud compute tpus tpu-vm create "$NAME" "${LOCATION_FLAGS[@]}" \
  "--accelerator-type=$ACCELERATOR" "--version=$RUNTIME" \
  "${CAPACITY[@]+"${CAPACITY[@]}"}" "${EXTRA[@]+"${EXTRA[@]}"}"
