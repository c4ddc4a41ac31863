#!/usr/bin/env bash
# Run one benchmark script at an earlier commit and on the working tree, alternating (A B A B …), in one session, so
# that the two are measured on the same machine under the same load. Each side runs its own copy of the script
# (from a temporary git worktree for the earlier commit), with src/ of that side first on PYTHONPATH.
#
#   benchmarks/before_after.sh REV ROUNDS SCRIPT [ARGS...]
#   benchmarks/before_after.sh fdb3f45 2 benchmarks/pretrain_speed.py --data ../shared/data/bus-bra/images \
#       --models vit_tiny_patch16 --img-size 96 --decoder-embed-dim 128 --decoder-depth 2 --decoder-num-heads 4 \
#       --batch-size 64 --steps 5
#
# Environment: PYTHON (default: .venv/bin/python if present, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
[[ $# -ge 3 ]] || { echo "usage: $0 REV ROUNDS SCRIPT [ARGS...]" >&2; exit 2; }
rev=$1 rounds=$2 script=$3
shift 3
PY=${PYTHON:-$( [[ -x .venv/bin/python ]] && echo "$PWD/.venv/bin/python" || echo python3 )}
before=$(mktemp -d)
trap 'git worktree remove --force "$before" >/dev/null 2>&1 || rm -rf "$before"' EXIT
git worktree add --detach "$before" "$rev" >/dev/null 2>&1
# relative data paths in ARGS keep working: both sides run from this folder
for ((r = 1; r <= rounds; r++)); do
  echo "== round $r: before ($(git rev-parse --short "$rev"))"
  PYTHONPATH="$before/src" "$PY" "$before/$script" "$@"
  echo "== round $r: after (working tree at $(git rev-parse --short HEAD)$(git diff --quiet || echo ', with changes'))"
  PYTHONPATH="$PWD/src" "$PY" "$script" "$@"
done
