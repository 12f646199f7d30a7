"""Text from a trained model: temperature, top-k and top-p (nucleus) sampling, or greedy decoding.

Shape suffixes: S = positions, V = vocabulary.

``generate(logits_fn, prompt_ids, ...)`` works with any function from token ids ``[1, S]`` to
logits ``[1, S, V]``: a megatron checkpoint (``trained_model.megatron_logits``) or an export
(``reference_model.GPT``). Each new token recomputes the whole context (no key/value cache: the
models here are small, and both model kinds then run the same code), at most the model's
``seq_length`` tokens of it. Logits of the padded vocabulary rows (ids the tokenizer does not
have) are never sampled. Generation stops at ``max_new_tokens`` or at the end-of-document token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch


class SamplingError(ValueError):
    """A ``SamplingConfig`` field out of range: ``field`` and ``message`` let a command line name
    its own flag."""

    def __init__(self, field: str, message: str):
        self.field, self.message = field, message
        super().__init__(f"SamplingConfig.{field}: {message}")


@dataclass
class SamplingConfig:
    """How the next token is chosen."""

    max_new_tokens: int = 64
    """Tokens to add at most."""
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy (the most likely token)."""
    top_k: int = 0
    """Sample among the k most likely tokens; 0: all."""
    top_p: float = 1.0
    """Sample among the most likely tokens whose probabilities add up to p; 1: all."""
    seed: int = 1234
    """Seed of the sampling generator (the same seed gives the same text)."""
    stop_at_eod: bool = True
    """End at the end-of-document token."""

    def validate(self) -> "SamplingConfig":
        def fail(name, message):
            raise SamplingError(name, message)

        if self.max_new_tokens < 1:
            fail("max_new_tokens", "must be >= 1")
        if self.temperature < 0:
            fail("temperature", "must be >= 0 (0: greedy)")
        if self.top_k < 0:
            fail("top_k", "must be >= 0 (0: no limit)")
        if not 0.0 < self.top_p <= 1.0:
            fail("top_p", "must be in (0, 1]")
        return self


def next_token_distribution(logits_V: torch.Tensor, config: SamplingConfig) -> torch.Tensor:
    """Probabilities of the next token after temperature, top-k and top-p (float32, sums to 1)."""
    logits_V = logits_V.float()
    if config.temperature == 0:
        probs_V = torch.zeros_like(logits_V)
        probs_V[logits_V.argmax()] = 1.0
        return probs_V
    logits_V = logits_V / config.temperature
    if config.top_k and config.top_k < logits_V.numel():
        kth = torch.topk(logits_V, config.top_k).values[-1]
        logits_V = logits_V.masked_fill(logits_V < kth, float("-inf"))
    probs_V = torch.softmax(logits_V, dim=-1)
    if config.top_p < 1.0:
        sorted_V, order_V = torch.sort(probs_V, descending=True)
        # keep a token if the mass before it is under p (the most likely one always stays)
        before_V = torch.cumsum(sorted_V, dim=-1) - sorted_V
        dropped_V = torch.zeros_like(probs_V, dtype=torch.bool)
        dropped_V[order_V] = before_V >= config.top_p
        probs_V = probs_V.masked_fill(dropped_V, 0.0)
        probs_V = probs_V / probs_V.sum()
    return probs_V


@torch.no_grad()
def generate(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    prompt_ids: list,
    config: SamplingConfig,
    *,
    vocab_size: int,
    context_length: int,
    eod: Optional[int] = None,
) -> list:
    """The new token ids after ``prompt_ids`` (the prompt itself not included).

    ``vocab_size``: the tokenizer's, below the model's padded vocabulary; ``context_length``: the
    most positions the model takes (its ``seq_length``). The model sees the last
    ``context_length`` tokens: of a longer prompt, only its end (``tools/generate.py`` says so).
    """
    config.validate()
    if not prompt_ids:
        raise ValueError("the prompt is empty: give at least one token of text")
    generator = torch.Generator().manual_seed(config.seed)
    ids = list(prompt_ids)
    new = []
    for _ in range(config.max_new_tokens):
        context_S = torch.tensor([ids[-context_length:]], dtype=torch.long)
        logits_V = logits_fn(context_S)[0, -1, :vocab_size].cpu()
        probs_V = next_token_distribution(logits_V, config)
        token = int(torch.multinomial(probs_V, 1, generator=generator))
        if config.stop_at_eod and eod is not None and token == eod:
            break
        ids.append(token)
        new.append(token)
    return new
