"""Text from a trained model: temperature, top-k and top-p (nucleus) sampling, or greedy decoding,
of several prompts at once.

Shape suffixes: B = prompts decoding together (batch rows), T = positions, V = vocabulary.

``generate(model, prompts, config, ...)`` continues each prompt (a list of token ids) and returns
each one's new tokens. ``model`` is one of

- a ``reference_model.GPT`` (an export, or a checkpoint converted by
  ``hf_export.reference_from_megatron``): the prompts are left-padded into one batch, with an
  attention mask, and decoded together. With ``use_cache=True`` (the default) the prompts run
  once (prefill) into a ``reference_model.KVCache``, then each step feeds one new token per row;
  with ``use_cache=False`` each step recomputes the whole batch's context. Exact for the routers
  the reference model implements (each routes a token by that token alone).
- a function from token ids [1, T] to logits [1, T, V] (a megatron checkpoint:
  ``trained_model.megatron_logits``): each prompt alone, unpadded, its whole context recomputed
  for every token, as before the cache. Such a function keeps no cache: ``use_cache`` must be
  False. This is the path for checkpoints whose routers route a token by the other tokens of its
  sequence (Expert Choice, Lory: a cached position's experts would go stale as the sequence
  grows, and padding would compete for them) and for routers the reference model lacks;
  ``cache_unavailable_reason`` says which.

The model sees at most ``context_length`` positions (its ``seq_length``): of a longer prompt, its
end; once a row outgrows it, each token recomputes the last ``context_length`` positions (keys
rotated for other positions cannot be reused), so the tokens are those of the uncached path. Each
row has its own sampling generator seeded with ``config.seed``: a prompt gets the same text alone
or in a batch, with or without the cache (up to float rounding of near-ties). Logits of the padded
vocabulary rows (ids the tokenizer does not have) are never sampled. A row stops at
``max_new_tokens`` or at the end-of-document token, and leaves the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, Union

import torch

from remoe_patches.inference import reference_model
from remoe_patches.config.router_registry import router_kind


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
    """Seed of each prompt's sampling generator (the same seed gives the same text)."""
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


def cache_unavailable_reason(router: str) -> Optional[str]:
    """Why a checkpoint of ``router`` is generated without the key/value cache, or None."""
    kind = router_kind(router)
    if kind.routes_by_neighbours:
        return (
            f"{kind.title} routes a token by the other tokens of its sequence, so cached "
            "keys and values would go stale as the sequence grows"
        )
    if router not in reference_model.ROUTERS:
        titles = ", ".join(router_kind(name).title for name in reference_model.ROUTERS)
        return (
            f"the cache runs in the reference model, which implements {titles} routing, "
            f"not {kind.title}"
        )
    return None


Model = Union[reference_model.GPT, Callable[[torch.Tensor], torch.Tensor]]


class GenerationModel(NamedTuple):
    """What ``generate`` needs of a loaded checkpoint or export."""

    model: Model
    tokenizer: object  # remoe_patches.data.tokenizer.Tokenizer
    context_length: int
    use_cache: bool
    no_cache_reason: Optional[str]  # why a cache was asked for and is not used


def load_for_generation(
    directory: str, *, tokenizer_dir: Optional[str] = None, use_cache: bool = True, device=None
) -> GenerationModel:
    """A checkpoint (any saved layout) or an export, ready for ``generate``.

    With ``use_cache``: the reference model (a checkpoint converted in memory), unless
    ``cache_unavailable_reason`` or the conversion says why not; then, and without
    ``use_cache``, a logits function (an export's reference model, a checkpoint's megatron-core
    model) that ``generate`` runs on each prompt alone.
    """
    from remoe_patches.inference.hf_export import (
        is_export_dir,
        load_export_for_inference,
        reference_from_megatron,
    )
    from remoe_patches.inference.trained_model import load_model_for_inference, megatron_logits

    if is_export_dir(directory):
        model, tokenizer, config = load_export_for_inference(directory, device=device)
        if use_cache:
            return GenerationModel(model, tokenizer, config["seq_length"], True, None)
        device = next(model.parameters()).device
        return GenerationModel(
            lambda tokens_1T: model(tokens_1T.to(device)),
            tokenizer,
            config["seq_length"],
            False,
            None,
        )
    megatron, tokenizer, model_config = load_model_for_inference(
        directory, tokenizer_dir=tokenizer_dir
    )
    context = model_config.seq_length
    reason = cache_unavailable_reason(model_config.router) if use_cache else None
    if use_cache and reason is None:
        try:
            reference = reference_from_megatron(
                megatron,
                model_config,
                tokenizer,
                device=device or next(megatron.parameters()).device,
            )
            return GenerationModel(reference, tokenizer, context, True, None)
        except ValueError as error:  # a feature the reference model lacks
            reason = str(error).split("; ")[0]
    return GenerationModel(
        lambda tokens_1T: megatron_logits(megatron, tokens_1T), tokenizer, context, False, reason
    )


@torch.no_grad()
def generate(
    model: Model,
    prompts: list,
    config: SamplingConfig,
    *,
    vocab_size: int,
    context_length: int,
    eod: Optional[int] = None,
    use_cache: bool = True,
) -> list:
    """Each prompt's new token ids (the prompt itself not included), in the prompts' order.

    ``prompts``: token id lists; ``vocab_size``: the tokenizer's, below the model's padded
    vocabulary; ``context_length``: the most positions the model takes (its ``seq_length``).
    The model sees the last ``context_length`` tokens of a row (``tools/generate.py`` says when
    a prompt is cut).
    """
    config.validate()
    if not isinstance(prompts, (list, tuple)) or not all(
        isinstance(prompt, (list, tuple)) for prompt in prompts
    ):
        raise ValueError(
            "prompts must be a list of token id lists; for one prompt pass [prompt_ids]"
        )
    for number, prompt in enumerate(prompts, start=1):
        if not prompt:
            raise ValueError(f"prompt {number} is empty: give at least one token of text")
    if isinstance(model, reference_model.GPT):
        return _generate_batch(model, prompts, config, vocab_size, context_length, eod, use_cache)
    if use_cache:
        raise ValueError(
            "a logits function keeps no key/value cache: pass use_cache=False, or "
            "a reference_model.GPT (hf_export.reference_from_megatron)"
        )
    return [
        _generate_alone(model, prompt, config, vocab_size, context_length, eod)
        for prompt in prompts
    ]


def _sample(logits_V: torch.Tensor, config: SamplingConfig, generator) -> int:
    return int(torch.multinomial(next_token_distribution(logits_V, config), 1, generator=generator))


def _generate_alone(logits_fn, prompt_ids, config, vocab_size, context_length, eod) -> list:
    """One prompt, its whole context recomputed for every new token."""
    generator = torch.Generator().manual_seed(config.seed)
    ids = list(prompt_ids)
    new = []
    for _ in range(config.max_new_tokens):
        context_1T = torch.tensor([ids[-context_length:]], dtype=torch.long)
        token = _sample(logits_fn(context_1T)[0, -1, :vocab_size].cpu(), config, generator)
        if config.stop_at_eod and eod is not None and token == eod:
            break
        ids.append(token)
        new.append(token)
    return new


def _generate_batch(model, prompts, config, vocab_size, context_length, eod, use_cache) -> list:
    """All prompts left-padded into one batch; with ``use_cache``, one new position per step."""
    device = next(model.parameters()).device
    width = max(len(prompt) for prompt in prompts)
    tokens_BT = torch.zeros(len(prompts), width, dtype=torch.long)
    mask_BT = torch.zeros(len(prompts), width, dtype=torch.long)
    for b, prompt in enumerate(prompts):
        tokens_BT[b, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask_BT[b, width - len(prompt) :] = 1
    tokens_BT, mask_BT = tokens_BT.to(device), mask_BT.to(device)
    generators = [torch.Generator().manual_seed(config.seed) for _ in prompts]
    new = [[] for _ in prompts]
    rows = list(range(len(prompts)))  # the prompt of each batch row still decoding
    cache = None
    for _ in range(config.max_new_tokens):
        if cache is not None and tokens_BT.shape[1] <= context_length:
            logits_BV = model(tokens_BT[:, -1:], attention_mask=mask_BT, cache=cache)[:, -1]
        else:  # the prefill, or a window past the context (no cache reaches it)
            fits = tokens_BT.shape[1] <= context_length
            cache = reference_model.KVCache() if use_cache and fits else None
            logits_BV = model(
                tokens_BT[:, -context_length:],
                attention_mask=mask_BT[:, -context_length:],
                cache=cache,
            )[:, -1]
        logits_BV = logits_BV[:, :vocab_size].float().cpu()
        next_B = [_sample(logits_BV[b], config, generators[row]) for b, row in enumerate(rows)]
        ended = [config.stop_at_eod and eod is not None and token == eod for token in next_B]
        for row, token, end in zip(rows, next_B, ended):
            if not end:
                new[row].append(token)
        going = [not end and len(new[row]) < config.max_new_tokens for row, end in zip(rows, ended)]
        if not any(going):
            break
        tokens_BT = torch.cat((tokens_BT, torch.tensor(next_B, device=device)[:, None]), dim=1)
        mask_BT = torch.cat((mask_BT, torch.ones_like(mask_BT[:, :1])), dim=1)
        if not all(going):  # finished rows leave; so do columns that are padding in every row
            keep_B = torch.tensor(
                [b for b, going_on in enumerate(going) if going_on], device=device
            )
            rows = [row for row, going_on in zip(rows, going) if going_on]
            tokens_BT, mask_BT = tokens_BT[keep_B], mask_BT[keep_B]
            start = int(mask_BT.any(dim=0).long().argmax())  # the first column with a token
            tokens_BT, mask_BT = tokens_BT[:, start:], mask_BT[:, start:]
            if cache is not None:
                cache.select(keep_B, start)
    return new
