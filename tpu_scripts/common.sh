# shellcheck shell=bash
# Shared helpers for the tpu_scripts/*.sh entry points (sourced, never run).
#
# Each script parses its own flags in a `case` and hands the rest to
# `common_flag` (--name, --zone, --project, --dry-run, --help); `require` turns a
# missing required flag into a one-line error; every external command goes
# through `run`, which with --dry-run prints the command on one line, each word
# shell-quoted with printf %q (paste the line into a shell and it runs as is),
# instead of running it. `--flag=value` and `--flag value` are both accepted.

DRY_RUN=0
NAME=""
ZONE=""
PROJECT=""
REMOTE_DIR="dma_jax"
CONSUMED=0
ARGS=()
LOCATION_FLAGS=()

# One-line error on stderr, exit 2 (the code `dma` uses for errors a user can fix).
die() {
  printf '%s: error: %s\n' "$(basename "$0")" "$*" >&2
  exit 2
}

# The script's header comment (every '#' line after the shebang), for --help.
usage() {
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
}

# Split --flag=value into --flag value (up to a bare --) into ARGS. The word after
# --gcloud-flag is a gcloud flag itself and is passed on unsplit.
normalize_args() {
  ARGS=()
  while (( $# )); do
    case $1 in
      --) ARGS+=("$@"); return ;;
      --gcloud-flag) ARGS+=("$1" "${2-}"); (( $# >= 2 )) && shift ;;
      --*=*) ARGS+=("${1%%=*}" "${1#*=}") ;;
      *) ARGS+=("$1") ;;
    esac
    shift
  done
}

# take_value FLAG "${2-}" "$#": the flag's value, or an error if there is none.
take_value() {
  local flag=$1 value=$2 nargs=$3
  if (( nargs < 2 )) || [[ -z "$value" || "$value" == -* ]]; then
    die "$flag needs a value"
  fi
  printf '%s' "$value"
}

# Flags every script takes; sets CONSUMED to the number of words used.
common_flag() {
  # shellcheck disable=SC2034  # CONSUMED is read by the calling script
  case $1 in
    --name) NAME=$(take_value "$1" "${2-}" "$#"); CONSUMED=2 ;;
    --zone) ZONE=$(take_value "$1" "${2-}" "$#"); CONSUMED=2 ;;
    --project) PROJECT=$(take_value "$1" "${2-}" "$#"); CONSUMED=2 ;;
    --dry-run) DRY_RUN=1; CONSUMED=1 ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
}

# require FLAG VALUE: a required flag that was not given is an error naming it.
require() {
  [[ -n "$2" ]] || die "missing required argument $1 (see --help)"
}

# --remote-dir must stay a plain relative path: it is pasted into remote commands.
check_remote_dir() {
  [[ "$REMOTE_DIR" =~ ^[A-Za-z0-9._/-]+$ && "$REMOTE_DIR" != /* ]] ||
    die "--remote-dir '$REMOTE_DIR' must be a relative path of letters, digits, '._/-'"
}

# Run a command, or with --dry-run print it shell-quoted on one line.
run() {
  if (( DRY_RUN )); then
    quote "$@"
    printf '\n'
  else
    "$@"
  fi
}

# The words of "$@" shell-quoted with printf %q and joined by spaces (no newline).
quote() {
  local line
  printf -v line '%q ' "$@"
  printf '%s' "${line% }"
}

# LOCATION_FLAGS: --zone (required) and --project (optional) for gcloud tpu-vm commands.
location_flags() {
  require --name "$NAME"
  require --zone "$ZONE"
  LOCATION_FLAGS=("--zone=$ZONE")
  if [[ -n "$PROJECT" ]]; then
    LOCATION_FLAGS+=("--project=$PROJECT")
  fi
}

# on_workers WORKER COMMAND: run a shell command line on TPU workers over ssh.
on_workers() {
  run gcloud compute tpus tpu-vm ssh "$NAME" "${LOCATION_FLAGS[@]}" "--worker=$1" "--command=$2"
}
