"""Independent computations that routing tests compare the package's routing with (loops,
numpy, plain floats), and the ReLU-gate test logits; shared by the tests of the routing math
and of the routers built on it."""

from __future__ import annotations

import math

import numpy as np
import torch

from remoe_patches.routing.sparsemixer import JITTER_EPS_DEFAULT

# --- ReLU gates: T tokens, E experts, K the top-k that load balancing assumes -----------------

T, E, K = 37, 8, 2


def logits_away_from_zero(seed=0, dtype=torch.float64):
    """Logits with |x| >= 0.05, so ReLU's kink never sits inside a finite-difference step."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, E, generator=gen, dtype=dtype)
    return torch.where(x.abs() < 0.05, torch.sign(x) * 0.05 + x, x)


# --- Hash and Expert Choice routing ------------------------------------------------------------


def reference_hash_table(vocab_size, num_experts, seed):
    """The table dealt by hand: the i-th id of the seeded permutation goes to expert i mod E."""
    permutation = torch.randperm(vocab_size, generator=torch.Generator().manual_seed(seed)).tolist()
    table = [None] * vocab_size
    for position, token_id in enumerate(permutation):
        table[token_id] = position % num_experts
    return table


def numpy_softmax(logits):
    logits = np.asarray(logits, dtype=np.float64)
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def reference_expert_choice(logits_SBE, topk, capacity_factor, group):
    """Loops: each group's token list, each expert sorts it by score and keeps the first C."""
    seq_length, batch_size, num_experts = logits_SBE.shape
    scores = numpy_softmax(logits_SBE.detach().numpy())
    if group == "sequence":
        groups = [[(s, b) for s in range(seq_length)] for b in range(batch_size)]
    else:
        groups = [[(s, b) for s in range(seq_length) for b in range(batch_size)]]
    chosen = np.zeros((seq_length * batch_size, num_experts), dtype=bool)
    for tokens in groups:
        capacity = max(
            1,
            min(
                len(tokens), int(np.floor(capacity_factor * len(tokens) * topk / num_experts + 0.5))
            ),
        )
        for e in range(num_experts):
            ranked = sorted(tokens, key=lambda sb: -scores[sb[0], sb[1], e])
            for s, b in ranked[:capacity]:
                chosen[s * batch_size + b, e] = True
    return chosen, scores.reshape(seq_length * batch_size, num_experts)


# --- Lory ---------------------------------------------------------------------------------------


def np_softmax(x):
    z = np.exp(x - x.max())
    return z / z.sum()


def np_swiglu_ffn(x, w_gate, w_up, w_down):
    gate = x @ w_gate
    return (gate / (1.0 + np.exp(-gate)) * (x @ w_up)) @ w_down


def reference_weights(hidden, router, segment_length, first_segment):
    """[B, N, E] routing weights, one segment at a time."""
    hidden, router = hidden.detach().numpy(), router.detach().numpy()
    seq, batch, _ = hidden.shape
    count, experts = seq // segment_length, router.shape[0]
    weights = np.zeros((batch, count, experts))
    for b in range(batch):
        for n in range(count):
            if n == 0 and first_segment == "uniform":
                weights[b, n] = 1.0 / experts
                continue
            source = max(n - 1, 0)  # "own_detached": segment 0 routes itself
            mean = hidden[source * segment_length : (source + 1) * segment_length, b].mean(axis=0)
            weights[b, n] = np_softmax(np.array([router[e] @ mean for e in range(experts)]))
    return weights


def reference_lory(hidden, router, fc1, fc2, segment_length, first_segment):
    """Output [S, B, h]: each token through its segment's FFN with merged weights."""
    weights = reference_weights(hidden, router, segment_length, first_segment)
    x, fc1, fc2 = hidden.detach().numpy(), fc1.detach().numpy(), fc2.detach().numpy()
    width = fc2.shape[1]
    out = np.zeros_like(x)
    for b in range(x.shape[1]):
        for n in range(weights.shape[1]):
            g = weights[b, n]
            w1 = sum(g[e] * fc1[e] for e in range(len(g)))
            w2 = sum(g[e] * fc2[e] for e in range(len(g)))
            for s in range(n * segment_length, (n + 1) * segment_length):
                out[s, b] = np_swiglu_ffn(x[s, b], w1[:, :width], w1[:, width:], w2)
    return out


# --- SparseMixer-v2 -----------------------------------------------------------------------------

EPS = JITTER_EPS_DEFAULT


def kept_experts(row, candidates, eps=EPS):
    """Experts of ``candidates`` with (m - s_e) / max(|s_e|, m) <= 2 eps (0/0 counts as kept)."""
    top = max(row[e] for e in candidates)
    kept = []
    for e in candidates:
        denominator = max(abs(row[e]), top)
        ratio = (top - row[e]) / denominator if denominator != 0 else 0.0
        if not ratio > 2 * eps:
            kept.append(e)
    return kept


def masked_softmax(row, kept):
    total = sum(math.exp(row[e]) for e in kept)
    return [math.exp(row[e]) / total if e in kept else 0.0 for e in range(len(row))]
