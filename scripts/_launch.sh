# shellcheck shell=bash
# Shared body of scripts/pretrain_<size>_<router>.sh; sourced by them, not run on its own.
#
# The caller sets CONFIG_NAME (configs/$CONFIG_NAME.yaml holds the paper's hyperparameters) and
# passes its own arguments through. This file reads the machine and layout from the environment,
# checks the layout, builds the torchrun command and either prints and validates it (--dry-run)
# or launches it.
#
# Environment (defaults in brackets):
#   DATA_PATH       --data-path: a prefix or a blend "w1 prefix1 w2 prefix2 ..." (required;
#                   scripts/preprocess_pile.sh prints the Pile's)
#   VOCAB_FILE      GPT-2 vocab.json (required)
#   MERGE_FILE      GPT-2 merges.txt (required)
#   CHECKPOINT_DIR  --save and --load, tensorboard in CHECKPOINT_DIR/tensorboard
#                   [runs/$CONFIG_NAME under the repository]
#   GPUS_PER_NODE [8]  NNODES [1]  NODE_RANK [0]  MASTER_ADDR [localhost]  MASTER_PORT [6000]
#                   (under Slurm: SLURM_GPUS_ON_NODE, SLURM_NNODES, SLURM_NODEID and the job's
#                   first node, from scontrol or else SLURM_JOB_NODELIST itself, so
#                   `srun --ntasks-per-node 1 scripts/pretrain_...sh` works; several nodes
#                   with a localhost master are refused)
#   TP [1]  EP [1]  PP [1]   tensor-, expert- and pipeline-parallel sizes; data parallelism takes
#                   the rest: DP = GPUS_PER_NODE * NNODES / (TP * PP). TP > 1 adds
#                   --sequence-parallel (megatron-core's MoE layers need it).
#   TORCHRUN [torchrun]  PYTHON [python]   the programs used
#   TORCH_ELASTIC_SHUTDOWN_TIMEOUT [300]  seconds torchrun gives its ranks after a SIGTERM
#
# Arguments: --dry-run (anywhere) prints the full command, validates it with pretrain_gpt.py's
# own parser (remoe_patches.cli.arguments) and exits without training: 0 when valid, 2 otherwise.
# Every other argument is passed through to pretrain_gpt.py after the script's flags, so it
# overrides them and the config (e.g. --train-iters 1000 --save-interval 500).

set -euo pipefail

_launcher="$(basename "$0")"
_fail() {
    echo "$_launcher: error: $*" >&2
    exit 2
}

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CONFIG="$REPO/configs/${CONFIG_NAME:?CONFIG_NAME must be set by the launcher}.yaml"
[ -f "$CONFIG" ] || _fail "no config file $CONFIG"

DRY_RUN=0
PASS_THROUGH=()
for _arg in "$@"; do
    if [ "$_arg" = "--dry-run" ]; then DRY_RUN=1; else PASS_THROUGH+=("$_arg"); fi
done

# Under Slurm (srun, one task per node) the node count, node rank, GPUs per node and the first
# node's address come from Slurm's variables unless set.
_slurm_master=""
if [ -n "${SLURM_JOB_NODELIST:-}" ] && command -v scontrol >/dev/null; then
    _slurm_master="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
elif [ -n "${SLURM_JOB_NODELIST:-}" ]; then
    # No scontrol (common inside containers): the first host of Slurm's compressed list,
    # "gpu[01-02,05]" -> gpu01, "node7,node8" -> node7 (one bracketed range per name).
    if [[ "$SLURM_JOB_NODELIST" =~ ^([^,\[]+)\[([0-9]+) ]]; then
        _slurm_master="${BASH_REMATCH[1]}${BASH_REMATCH[2]}"
    else
        _slurm_master="${SLURM_JOB_NODELIST%%,*}"
    fi
fi
GPUS_PER_NODE="${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}"
NNODES="${NNODES:-${SLURM_NNODES:-1}}"
NODE_RANK="${NODE_RANK:-${SLURM_NODEID:-0}}"
MASTER_ADDR="${MASTER_ADDR:-${_slurm_master:-localhost}}"
MASTER_PORT="${MASTER_PORT:-6000}"
TP="${TP:-1}"
EP="${EP:-1}"
PP="${PP:-1}"
CHECKPOINT_DIR="${CHECKPOINT_DIR:-$REPO/runs/$CONFIG_NAME}"
TORCHRUN="${TORCHRUN:-torchrun}"
PYTHON="${PYTHON:-python}"

for _name in GPUS_PER_NODE NNODES TP EP PP MASTER_PORT; do
    [[ "${!_name}" =~ ^[1-9][0-9]*$ ]] || _fail "$_name=${!_name} is not a positive integer"
done
if ! [[ "$NODE_RANK" =~ ^[0-9]+$ ]] || [ "$NODE_RANK" -ge "$NNODES" ]; then
    _fail "NODE_RANK=$NODE_RANK must be between 0 and NNODES-1=$((NNODES - 1))"
fi

WORLD_SIZE=$((GPUS_PER_NODE * NNODES))
if ((WORLD_SIZE % (TP * PP))); then
    _fail "TP=$TP x PP=$PP = $((TP * PP)) does not divide the $WORLD_SIZE GPUs" \
        "(NNODES=$NNODES x GPUS_PER_NODE=$GPUS_PER_NODE); choose TP and PP whose product divides it"
fi
if (((WORLD_SIZE / PP) % (TP * EP))); then
    _fail "TP=$TP x EP=$EP = $((TP * EP)) does not divide the $((WORLD_SIZE / PP)) GPUs of a" \
        "pipeline stage ($WORLD_SIZE GPUs / PP=$PP); lower EP or TP"
fi
if [ "$NNODES" -gt 1 ] && [[ "$MASTER_ADDR" =~ ^(localhost|127\.[0-9.]+|::1)$ ]]; then
    _fail "NNODES=$NNODES with MASTER_ADDR=$MASTER_ADDR: every node would wait for itself; set" \
        "MASTER_ADDR to the first node's address (under Slurm it comes from SLURM_JOB_NODELIST)"
fi
DP=$((WORLD_SIZE / (TP * PP)))

_missing=()
for _name in DATA_PATH VOCAB_FILE MERGE_FILE; do
    [ -n "${!_name:-}" ] || _missing+=("$_name")
done
[ ${#_missing[@]} -eq 0 ] || _fail "${_missing[*]} not set; export the tokenized data" \
    "(scripts/preprocess_pile.sh prints DATA_PATH) and the GPT-2 vocab.json and merges.txt"
read -r -a DATA_ARGS <<<"$DATA_PATH"

TRAIN_ARGS=(
    --config "$CONFIG"
    --data-path "${DATA_ARGS[@]}"
    --vocab-file "$VOCAB_FILE"
    --merge-file "$MERGE_FILE"
    --save "$CHECKPOINT_DIR"
    --load "$CHECKPOINT_DIR"
    --tensorboard-dir "$CHECKPOINT_DIR/tensorboard"
    --tensor-model-parallel-size "$TP"
    --pipeline-model-parallel-size "$PP"
    --expert-model-parallel-size "$EP"
)
if [ "$TP" -gt 1 ]; then TRAIN_ARGS+=(--sequence-parallel); fi
TRAIN_ARGS+=(${PASS_THROUGH[@]+"${PASS_THROUGH[@]}"})

# Speed-only on GPUs, as the authors' scripts export them.
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
# torchrun SIGKILLs its ranks this long after it forwards a SIGTERM (30 s by default), too short
# for --exit-signal-handler's last step and save at 978M; torch >= 2.12 reads it.
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-300}"

COMMAND=(
    "$TORCHRUN"
    --nproc-per-node "$GPUS_PER_NODE"
    --nnodes "$NNODES"
    --node-rank "$NODE_RANK"
    --master-addr "$MASTER_ADDR"
    --master-port "$MASTER_PORT"
    "$REPO/pretrain_gpt.py"
    "${TRAIN_ARGS[@]}"
)

_check() {
    "$PYTHON" "$REPO/scripts/_check_launch.py" --world-size "$WORLD_SIZE" \
        --gpus-per-node "$GPUS_PER_NODE" --nnodes "$NNODES" -- "${TRAIN_ARGS[@]}"
}

if [ "$DRY_RUN" = 1 ]; then
    for _name in CUDA_DEVICE_MAX_CONNECTIONS PYTORCH_CUDA_ALLOC_CONF \
        TORCH_ELASTIC_SHUTDOWN_TIMEOUT; do
        printf '%s=%q ' "$_name" "${!_name}"
    done
    printf '%q' "${COMMAND[0]}"
    printf ' %q' "${COMMAND[@]:1}"
    printf '\n'
    _check
    exit $?
fi

# Refuse a bad command here, once, rather than in every rank after torchrun started them.
_check >/dev/null
echo "$_launcher: $((NNODES)) node(s) x $GPUS_PER_NODE GPUs, TP=$TP PP=$PP EP=$EP DP=$DP;" \
    "checkpoints in $CHECKPOINT_DIR" >&2
exec "${COMMAND[@]}"
