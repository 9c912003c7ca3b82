#!/usr/bin/env bash
# Usage: tpu_scripts/install.sh --name NAME --zone ZONE [--project PROJECT]
#            [--repo-url URL [--ref REF] | --source DIR] [--remote-dir DIR]
#            [--python PYTHON] [--pip PACKAGE]... [--dry-run]
#
# Install dma_jax on every worker of the TPU VM: put the code in ~/DIR (default
# ~/dma_jax), create DIR/.venv, `pip install -e .` with jax[tpu] (the TPU build of
# jax), gcsfs and google-cloud-storage (gs:// paths: run.out_dir, checkpoints, TFDS data dirs, inputs).
# Safe to re-run after editing the code: the venv is kept and only updated.
#
# The code comes from either
#   --source DIR     a local checkout (default: the one holding this script), packed
#                    with tar (without .git, .venv, runs/) and copied to all workers
#                    with `gcloud compute tpus tpu-vm scp --worker=all`, or
#   --repo-url URL   a git repository every worker clones (--ref: branch, tag or
#                    commit; default: the repository's default branch).
#
#   --remote-dir DIR   directory under the remote home (default dma_jax)
#   --python PYTHON    interpreter for the venv, >= 3.10 (default python3)
#   --pip PACKAGE      another package to install into the venv; repeatable
#   --dry-run          print the commands instead of running them
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

SOURCE=""
REPO_URL=""
REF="HEAD"
PYTHON="python3"
PIP=("jax[tpu]" "gcsfs" "google-cloud-storage")
normalize_args "$@"
set -- "${ARGS[@]+"${ARGS[@]}"}"
while (( $# )); do
  case $1 in
    --source) SOURCE=$(take_value "$1" "${2-}" "$#"); shift 2 ;;
    --repo-url) REPO_URL=$(take_value "$1" "${2-}" "$#"); shift 2 ;;
    --ref) REF=$(take_value "$1" "${2-}" "$#"); shift 2 ;;
    --remote-dir) REMOTE_DIR=$(take_value "$1" "${2-}" "$#"); shift 2 ;;
    --python) PYTHON=$(take_value "$1" "${2-}" "$#"); shift 2 ;;
    --pip) PIP+=("$(take_value "$1" "${2-}" "$#")"); shift 2 ;;
    *) common_flag "$@"; shift "$CONSUMED" ;;
  esac
done
location_flags
check_remote_dir
[[ -z "$SOURCE" || -z "$REPO_URL" ]] || die "--source and --repo-url are exclusive"

DIR=$(quote "$REMOTE_DIR")
if [[ -n "$REPO_URL" ]]; then
  FETCH="{ [ -d $DIR/.git ] || git clone --quiet $(quote "$REPO_URL") $DIR; }"
  FETCH+=" && git -C $DIR fetch --quiet $(quote "$REPO_URL") $(quote "$REF")"
  FETCH+=" && git -C $DIR checkout --quiet --detach FETCH_HEAD"
else
  SOURCE=${SOURCE:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
  [[ -f "$SOURCE/pyproject.toml" ]] || die "--source $SOURCE: no pyproject.toml there (not a dma_jax checkout)"
  ARCHIVE="${TMPDIR:-/tmp}/dma_jax-src-$NAME.tar.gz"
  run tar -C "$SOURCE" --exclude=./.git --exclude=./.venv --exclude=./runs \
    --exclude='*.egg-info' --exclude=__pycache__ -czf "$ARCHIVE" .
  run gcloud compute tpus tpu-vm scp "$ARCHIVE" "$NAME:dma_jax-src.tar.gz" "${LOCATION_FLAGS[@]}" --worker=all
  FETCH="mkdir -p $DIR && tar -xzf dma_jax-src.tar.gz -C $DIR && rm dma_jax-src.tar.gz"
fi

PY=$(quote "$PYTHON")
SETUP="$FETCH && cd $DIR"
# Ubuntu's python3 lacks venv until python3-venv is installed.
SETUP+=" && { $PY -c 'import ensurepip' 2>/dev/null"
SETUP+=" || { sudo apt-get update -qq && sudo apt-get install -y -qq python3-venv; }; }"
SETUP+=" && { [ -x .venv/bin/python ] || $PY -m venv .venv; }"
SETUP+=" && .venv/bin/pip install --quiet --upgrade pip"
SETUP+=" && .venv/bin/pip install --quiet -e . $(quote "${PIP[@]}")"
SETUP+=" && .venv/bin/python -c 'import jax; print(jax.process_index(), jax.device_count(), jax.devices()[0].device_kind)'"
on_workers all "$SETUP"
