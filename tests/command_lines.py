"""Megatron-LM command lines that the argument tests parse: the ReMoE authors' 182M launch and a
small valid one."""

# The authors' 182M ReMoE launch (spec §7), with the 29-pair --data-path blend cut to 3 pairs.
AUTHORS_182M_REMOE = [
    "--use-mcore-models", "--disable-bias-linear",
    "--seq-length", "1024", "--max-position-embeddings", "1024",
    "--num-layers", "12", "--hidden-size", "768", "--num-attention-heads", "12",
    "--init-method-std", "0.01", "--attention-dropout", "0.0", "--hidden-dropout", "0.0",
    "--normalization", "RMSNorm", "--position-embedding-type", "rope", "--swiglu",
    "--untie-embeddings-and-output-weights", "--group-query-attention", "--num-query-groups", "4",
    "--no-masked-softmax-fusion", "--no-position-embedding", "--rotary-base", "1000000",
    "--num-experts", "8", "--moe-router-topk", "1",
    "--moe-router-load-balancing-type", "aux_loss", "--moe-aux-loss-coeff", "1e-2",
    "--moe-grouped-gemm", "--moe-token-dispatcher-type", "alltoall",
    "--overlap-param-gather", "--overlap-grad-reduce",
    "--moe-relu-routing", "--moe-router-pre-softmax", "--moe-granularity", "1",
    "--moe-layer-recompute",
    "--vocab-file", "gpt2-vocab.json", "--merge-file", "gpt2-merges.txt",
    "--make-vocab-size-divisible-by", "1024",
    "--data-path", "0.0260", "../pile/00_text_document", "0.0251", "../pile/01_text_document",
    "0.0249", "../pile/02_text_document",
    "--split", "969,30,1",
    "--micro-batch-size", "16", "--global-batch-size", "512", "--lr", "5e-4",
    "--train-iters", "60000", "--lr-decay-style", "cosine", "--min-lr", "5e-5",
    "--lr-warmup-fraction", "0.01", "--clip-grad", "1.0", "--bf16", "--use-flash-attn",
    "--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "1",
    "--use-distributed-optimizer", "--sequence-parallel",
    "--log-interval", "10", "--log-throughput", "--save-interval", "5000",
    "--eval-interval", "1000", "--eval-iters", "100",
    "--save", "ckpt/182m", "--load", "ckpt/182m", "--tensorboard-dir", "ckpt/182m/tensorboard",
]

# A small valid LLaMA-recipe command line for the error tests.
TINY_FLAGS = [
    "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
    "--micro-batch-size", "2", "--lr", "1e-3", "--train-iters", "10",
    "--normalization", "RMSNorm", "--swiglu", "--untie-embeddings-and-output-weights",
    "--disable-bias-linear", "--position-embedding-type", "rope",
    "--attention-dropout", "0.0", "--hidden-dropout", "0.0",
]
TINY_MOE_FLAGS = TINY_FLAGS + ["--num-experts", "8", "--moe-router-topk", "1",
                               "--moe-router-pre-softmax"]
