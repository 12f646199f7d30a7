#!/usr/bin/env bash
# The Pile's jsonl shards -> megatron indexed datasets with GPT-2 BPE, one output prefix per shard
# (tools/preprocess_data.py, the authors' flags: --append-eod, --workers), then the --data-path
# blend to train on.
#
#   PILE_DIR=/data/pile/train OUTPUT_DIR=data/pile VOCAB_FILE=gpt2-vocab.json \
#       MERGE_FILE=gpt2-merges.txt WORKERS=32 scripts/preprocess_pile.sh
#
# Environment:
#   PILE_DIR     the shards: NAME.jsonl, or NAME.jsonl.zst (decompressed one at a time with zstd
#                next to the outputs and removed afterwards) (required)
#   OUTPUT_DIR   shard NAME becomes OUTPUT_DIR/pile_NAME_text_document.bin/.idx (required)
#   VOCAB_FILE, MERGE_FILE   GPT-2 vocab.json and merges.txt (required)
#   WORKERS      tokenizer processes per shard [number of CPUs]
#   PYTHON       [python]
#
# A shard whose .bin and .idx exist already is skipped, so an interrupted run resumes. The blend
# weights are the shards' shares of all tokens (.bin sizes), so every document weighs the same.
# The last lines printed are the blend, as DATA_PATH for scripts/pretrain_*.sh; it is also
# written to OUTPUT_DIR/data_path.txt.

set -euo pipefail

_fail() {
    echo "preprocess_pile.sh: error: $*" >&2
    exit 2
}

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"
WORKERS="${WORKERS:-$(nproc 2>/dev/null || echo 1)}"
_missing=()
for _name in PILE_DIR OUTPUT_DIR VOCAB_FILE MERGE_FILE; do
    [ -n "${!_name:-}" ] || _missing+=("$_name")
done
[ ${#_missing[@]} -eq 0 ] || _fail "${_missing[*]} not set (see the top of this script)"
[ -d "$PILE_DIR" ] || _fail "PILE_DIR=$PILE_DIR is not a directory"
for _file in "$VOCAB_FILE" "$MERGE_FILE"; do
    [ -f "$_file" ] || _fail "$_file does not exist"
done
[[ "$WORKERS" =~ ^[1-9][0-9]*$ ]] || _fail "WORKERS=$WORKERS is not a positive integer"

# NAME -> input file; a plain .jsonl wins over a .jsonl.zst of the same name.
declare -A SHARDS=()
while IFS= read -r -d '' _file; do
    _base="$(basename "$_file")"
    case "$_base" in
        *.jsonl.zst) _name="${_base%.jsonl.zst}"; [ -n "${SHARDS[$_name]:-}" ] || SHARDS[$_name]="$_file" ;;
        *.jsonl) _name="${_base%.jsonl}"; SHARDS[$_name]="$_file" ;;
    esac
done < <(find "$PILE_DIR" -maxdepth 1 \( -name '*.jsonl' -o -name '*.jsonl.zst' \) -print0 | sort -z)
[ ${#SHARDS[@]} -gt 0 ] || _fail "no *.jsonl or *.jsonl.zst shards in $PILE_DIR"
mapfile -t NAMES < <(printf '%s\n' "${!SHARDS[@]}" | sort)

mkdir -p "$OUTPUT_DIR"
PREFIXES=()
for _name in "${NAMES[@]}"; do
    _input="${SHARDS[$_name]}"
    _prefix="$OUTPUT_DIR/pile_$_name"
    _dataset="${_prefix}_text_document"
    PREFIXES+=("$_dataset")
    if [ -f "$_dataset.bin" ] && [ -f "$_dataset.idx" ]; then
        echo "skip $_name: $_dataset.bin/.idx exist"
        continue
    fi
    _temp=""
    if [[ "$_input" == *.zst ]]; then
        command -v zstd >/dev/null || _fail "$_input is zstd-compressed and zstd is not installed"
        _temp="$OUTPUT_DIR/.pile_$_name.jsonl.tmp"
        echo "decompress $_input"
        zstd -dc "$_input" >"$_temp"
        _input="$_temp"
    fi
    echo "tokenize $_name -> $_dataset"
    "$PYTHON" "$REPO/tools/preprocess_data.py" --input "$_input" --output-prefix "$_prefix" \
        --tokenizer-type GPT2BPETokenizer --vocab-file "$VOCAB_FILE" --merge-file "$MERGE_FILE" \
        --append-eod --workers "$WORKERS"
    [ -z "$_temp" ] || rm -f "$_temp"
done

# Weights: each shard's share of the tokens (all .bin files hold the same token dtype).
SIZES=()
for _dataset in "${PREFIXES[@]}"; do
    SIZES+=("$(stat -c %s "$_dataset.bin")")
done
BLEND="$(
    for _i in "${!PREFIXES[@]}"; do printf '%s %s\n' "${SIZES[$_i]}" "${PREFIXES[$_i]}"; done |
        awk '{size[NR] = $1; prefix[NR] = $2; total += $1}
             END {for (i = 1; i <= NR; i++) printf "%s%.6f %s", (i > 1 ? " " : ""), size[i] / total, prefix[i]}'
)"
echo "$BLEND" >"$OUTPUT_DIR/data_path.txt"
echo "${#PREFIXES[@]} shard(s) in $OUTPUT_DIR; train with (also in $OUTPUT_DIR/data_path.txt):"
echo "export DATA_PATH=\"$BLEND\""
