"""The reference model's key/value cache and padding mask, against the model's own full forward
pass on unpadded rows (positions 0..S-1, no cache, no mask: the path tests/tools/test_export.py
checks against megatron-core).

Shape suffixes: B = rows, S = positions, V = vocabulary.

Tolerance: float32, max |difference| <= 1e-5 x max |logit| (measured: under 1e-6 relative; the
cached and padded forwards multiply matrices of other shapes, nothing else differs). The model is
``tiny_reference.tiny_model``: weights far from their init, routers that vary (checked).
"""

from __future__ import annotations

import pytest
import torch

from remoe_patches.inference import reference_model
from remoe_patches.inference.reference_model import GPT, KVCache
from remoe_patches.config.router_registry import ROUTERS
from tiny_reference import random_rows, tiny_model

RELATIVE_TOLERANCE = 1e-5


def assert_close(got, expected):
    scale = float(expected.abs().max())
    error = float((got - expected).abs().max())
    assert error <= RELATIVE_TOLERANCE * scale, (error, scale)


def left_padded(prompts: list) -> tuple:
    width = max(len(p) for p in prompts)
    tokens_BS = torch.zeros(len(prompts), width, dtype=torch.long)
    mask_BS = torch.zeros(len(prompts), width, dtype=torch.long)
    for b, prompt in enumerate(prompts):
        tokens_BS[b, width - len(prompt) :] = prompt
        mask_BS[b, width - len(prompt) :] = 1
    return tokens_BS, mask_BS


@pytest.mark.parametrize("router", ["relu", "topk", "dense"])
def test_cached_logits_equal_the_full_forward_at_every_step(router):
    model = tiny_model(router)
    tokens_BS = torch.stack(random_rows(20, 20, 20))
    with torch.no_grad():
        cache = KVCache()
        pieces = [model(tokens_BS[:, :7], cache=cache)]  # a prefill, then 1, 1, 3, 1, ... tokens
        for start, end in [(7, 8), (8, 9), (9, 12)] + [(i, i + 1) for i in range(12, 20)]:
            assert cache.get_seq_length() == start
            step_BSV = model(tokens_BS[:, start:end], cache=cache)
            # each step against the whole prefix recomputed
            assert_close(step_BSV, model(tokens_BS[:, :end])[:, start:end])
            pieces.append(step_BSV)
        assert_close(torch.cat(pieces, dim=1), model(tokens_BS))
    assert [k.shape for k in cache.keys_BGTd] == [(3, 2, 20, 8)] * 2  # groups, not heads
    if router == "relu":
        layer = model.decoder.layers[0]
        with torch.no_grad():
            hidden = layer.pre_mlp_layernorm(model.embedding.word_embeddings(tokens_BS))
            active = (layer.mlp.router(hidden.reshape(-1, 32)) > 0).float()
        assert 0.1 < float(active.mean()) < 0.9
        assert int((active.sum(0) > 0).sum()) == 4


@pytest.mark.parametrize("router", ["relu", "topk"])
def test_left_padded_rows_get_the_logits_they_get_alone(router):
    model = tiny_model(router)
    prompts = random_rows(5, 12, 1, 9)
    continuation = random_rows(6, 6, 6, 6, seed=2)
    tokens_BS, mask_BS = left_padded(prompts)
    with torch.no_grad():
        alone = [model(torch.cat((p, c))[None])[0] for p, c in zip(prompts, continuation)]
        padded_BSV = model(tokens_BS, attention_mask=mask_BS)
        for b, prompt in enumerate(prompts):
            assert_close(padded_BSV[b, -len(prompt) :], alone[b][: len(prompt)])
        assert torch.isfinite(padded_BSV).all()  # padding rows too (a padding query sees itself)

        # decoding on: the prompt once, then one token per step, the mask growing with it
        cache = KVCache()
        model(tokens_BS, attention_mask=mask_BS, cache=cache)
        for step in range(6):
            mask_BS = torch.cat((mask_BS, torch.ones(4, 1, dtype=torch.long)), dim=1)
            next_B1 = torch.stack([c[step : step + 1] for c in continuation])
            logits_BV = model(next_B1, attention_mask=mask_BS, cache=cache)[:, 0]
            for b, prompt in enumerate(prompts):
                assert_close(logits_BV[b], alone[b][len(prompt) + step])

        # what the mask does: unmasked, the padding is read and the positions start at column 0
        unmasked_BSV = model(tokens_BS)
        assert float((unmasked_BSV[0, -5:] - alone[0][:5]).abs().max()) > 1e-2


def test_rows_and_columns_leave_the_cache():
    model = tiny_model("relu")
    prompts = random_rows(4, 10, 7)
    tokens_BS, mask_BS = left_padded(prompts)
    with torch.no_grad():
        cache = KVCache()
        model(tokens_BS, attention_mask=mask_BS, cache=cache)
        # the 10-token row leaves; the first 3 columns are then padding in both rows left
        keep = torch.tensor([0, 2])
        cache.select(keep, start=3)
        assert cache.get_seq_length() == 7
        next_B1 = torch.tensor([[5], [6]])
        mask_BS = torch.cat((mask_BS[keep, 3:], torch.ones(2, 1, dtype=torch.long)), dim=1)
        logits_BV = model(next_B1, attention_mask=mask_BS, cache=cache)[:, 0]
        for b, (prompt, token) in enumerate(zip([prompts[0], prompts[2]], [5, 6])):
            alone_V = model(torch.cat((prompt, torch.tensor([token])))[None])[0, -1]
            assert_close(logits_BV[b], alone_V)


def test_a_mask_of_the_wrong_width_is_refused():
    model = tiny_model("topk")
    cache = KVCache()
    with torch.no_grad():
        model(torch.zeros(2, 4, dtype=torch.long), cache=cache)
        with pytest.raises(
            ValueError,
            match=r"^attention_mask is \[2, 1\], expected \[batch, "
            r"cached \+ new positions\] = \[2, 5\]$",
        ):
            model(torch.zeros(2, 1, dtype=torch.long), attention_mask=torch.ones(2, 1), cache=cache)


def test_only_routers_that_route_a_token_by_itself_are_implemented():
    """The cache is exact only for them: a router that routes by the other tokens of a sequence
    would leave cached positions stale, and the reference model refuses it."""
    assert set(reference_model.ROUTERS) <= set(ROUTERS)
    assert not any(ROUTERS[name].routes_by_neighbours for name in reference_model.ROUTERS)
    for name, kind in ROUTERS.items():
        if kind.routes_by_neighbours:
            config = tiny_model("relu").config
            config.router = name
            with pytest.raises(
                ValueError,
                match=rf"^the reference model implements the dense, "
                rf"topk, relu routers, not '{name}': run the checkpoint itself",
            ):
                GPT(config)
