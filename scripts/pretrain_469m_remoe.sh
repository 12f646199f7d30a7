#!/usr/bin/env bash
# The paper's 469M ReMoE (ReLU routing, E=8, k=1, load-balanced adaptive L1),
# on one node of 8 GPUs with the hyperparameters of configs/469m_remoe.yaml:
#
#   DATA_PATH="1.0 data/pile_00_text_document ..." VOCAB_FILE=gpt2-vocab.json \
#       MERGE_FILE=gpt2-merges.txt CHECKPOINT_DIR=ckpt/469m_remoe \
#       scripts/pretrain_469m_remoe.sh [--dry-run] [extra pretrain_gpt.py flags]
#
# The machine and the layout come from the environment (GPUS_PER_NODE, NNODES, NODE_RANK,
# MASTER_ADDR, MASTER_PORT, TP, EP, PP): see scripts/_launch.sh.
# shellcheck disable=SC2034  # read by _launch.sh
CONFIG_NAME=469m_remoe
# shellcheck source=scripts/_launch.sh
source "$(dirname "${BASH_SOURCE[0]}")/_launch.sh"
