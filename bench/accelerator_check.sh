#!/usr/bin/env bash
# The accelerator check in one command (issue 19): on a GPU or TPU machine with the package installed
# (`make install`: .venv), within `timeout 540`:
#
#     bash bench/accelerator_check.sh [OUT_DIR] [--quick] [--allow-cpu] [--budget-s S]
#
# writes OUT_DIR/accelerator_check.json and OUT_DIR/accelerator_check.md (a section for BENCHMARKS.md, also
# printed); OUT_DIR defaults to runs/accelerator_check. Nothing is downloaded. Exits non-zero when the check
# fails or refuses to run (a CPU without --quick / --allow-cpu).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out_dir="${1:-runs/accelerator_check}"
if [[ "$out_dir" == --* ]]; then  # no OUT_DIR, only options
  out_dir=runs/accelerator_check
else
  shift $(( $# > 0 ? 1 : 0 ))
fi
mkdir -p "$out_dir"
out_dir="$(cd "$out_dir" && pwd)"

python="$repo/.venv/bin/python"
[[ -x "$python" ]] || python="$(command -v python3)"
if ! "$python" -c "import dma_jax" 2>/dev/null; then
  echo "accelerator_check.sh: $python cannot import dma_jax: run \`make install\` in $repo first" >&2
  exit 3
fi

cd "$repo"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"  # GPU: room for the 1B target
exec "$python" bench/accelerator_check.py "$out_dir/accelerator_check.json" "$@"
