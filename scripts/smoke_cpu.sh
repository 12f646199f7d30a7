#!/usr/bin/env bash
# A shrunken scripts/pretrain_182m_remoe.sh on CPU: the same launcher and config
# (configs/182m_remoe.yaml), with the model and batch cut to CPU size by extra flags, for a few
# steps on the demo corpus (built and cached on first use). Checks a cluster launch end to end
# before it costs GPU hours.
#
#   scripts/smoke_cpu.sh                       # 2 CPU ranks (data parallel), 10 steps
#   GPUS_PER_NODE=2 EP=2 scripts/smoke_cpu.sh  # expert parallel over the 2 ranks
#   GPUS_PER_NODE=1 scripts/smoke_cpu.sh --train-iters 4 --dry-run
#
# Environment: what scripts/_launch.sh reads, with CPU defaults: GPUS_PER_NODE [2], MASTER_PORT
# [a free one], CHECKPOINT_DIR [a new temporary directory, removed on exit; set it to keep the
# run]; DATA_PATH, VOCAB_FILE and MERGE_FILE [the demo corpus]. Extra arguments go to
# pretrain_gpt.py after the shrinking flags.

set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"

export GPUS_PER_NODE="${GPUS_PER_NODE:-2}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
if [ -z "${MASTER_PORT:-}" ]; then
    MASTER_PORT="$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
    export MASTER_PORT
fi
KEEP_RUN=1
if [ -z "${CHECKPOINT_DIR:-}" ]; then
    CHECKPOINT_DIR="$(mktemp -d "${TMPDIR:-/tmp}/remoe_smoke.XXXXXX")"
    export CHECKPOINT_DIR
    KEEP_RUN=0
    # a check, not a run to keep: its checkpoints (tens of MB) go when the script ends, however
    trap 'rm -rf -- "$CHECKPOINT_DIR"' EXIT
fi
if [ -z "${DATA_PATH:-}" ]; then
    # shellcheck disable=SC2016
    eval "$(cd "$REPO" && "$PYTHON" -c '
import shlex
from remoe_patches.data.demo_corpus import ensure_demo_corpus
corpus = ensure_demo_corpus()
for name, value in (("DATA_PATH", corpus.data_prefix), ("VOCAB_FILE", corpus.vocab_file),
                    ("MERGE_FILE", corpus.merge_file)):
    print(f"export {name}={shlex.quote(value)}")
')"
fi

# The 182M model and batch shrunk to CPU size; everything else stays the launcher's.
TINY=(
    --num-layers 2 --hidden-size 64 --num-attention-heads 4 --num-query-groups 2
    --ffn-hidden-size 256 --seq-length 64 --max-position-embeddings 64
    --make-vocab-size-divisible-by 128
    --micro-batch-size 2 --global-batch-size 8 --train-iters 10
    --lr 2e-3 --min-lr 2e-4 --lr-warmup-iters 2
    --log-interval 1 --eval-interval 5 --eval-iters 2 --save-interval 5
)

"$REPO/scripts/pretrain_182m_remoe.sh" "${TINY[@]}" "$@"
case " $* " in
    *" --dry-run "*) ;;
    *) if [ "$KEEP_RUN" = 1 ]; then
           echo "smoke_cpu.sh: done; metrics and checkpoints in $CHECKPOINT_DIR"
       else
           echo "smoke_cpu.sh: done; its temporary checkpoints are removed (set CHECKPOINT_DIR to keep them)"
       fi ;;
esac
