"""A dropless token path for one rank's experts with device-side offsets: ``--moe-token-dispatcher-
type sorted``.

Shape suffixes: T = tokens of the layer, E = experts, H = hidden size, P = routed (token, expert)
pairs, the number of gates above zero (0..T*E with ReLU routing, T*k with TopK).

megatron-core's dropless dispatchers read several token counts on the host per layer (to size
all-to-all buffers, to cut chunks, and for the experts), and each read makes the host wait for
the device. Without expert or tensor parallelism nothing has to travel between ranks, so the
whole path can stay on the device, as torchtitan's MoE does:

    pairs sorted by expert     one stable sort of the E x T routing map (expert-major)
    expert inputs              the P token rows gathered in that order
    grouped GEMM offsets       cumsum of the per-expert counts, on the device
                               (``local_layers.GroupedGemmExperts`` takes them as they are)
    combine                    each pair's output added back onto its token (index_add)

The one value read on the host is P, to size the gathered rows: one sync per layer and
micro-batch. Results equal megatron-core's alltoall dispatcher's (same order of pairs, the gates
applied by the experts); ``tests/model/test_token_dispatch.py`` checks losses and gradients against
it.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Optional

import torch

from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.token_dispatcher import MoETokenDispatcher


class SortedTokenDispatcher(MoETokenDispatcher):
    """megatron-core's dispatcher interface for all experts on this rank (EP = TP = 1)."""

    def __init__(self, config, pg_collection=None):
        super().__init__(config=config, pg_collection=pg_collection)
        if self.ep_size != 1 or self.tp_size != 1:
            raise ValueError(
                f"the sorted token dispatcher keeps every expert on its rank: it needs expert and "
                f"tensor parallel sizes 1, not EP={self.ep_size} TP={self.tp_size}; use "
                "--moe-token-dispatcher-type alltoall"
            )
        self._input_shape: Optional[torch.Size] = None
        self._token_of_pair_P: Optional[torch.Tensor] = None
        self._tokens_per_expert_E: Optional[torch.Tensor] = None

    def dispatch_preprocess(self, tokens, routing_map, probs):
        self._input_shape = tokens.shape
        tokens_TH = tokens.reshape(-1, tokens.shape[-1])
        routing_map_TE = routing_map.reshape(tokens_TH.shape[0], -1)
        probs_TE = probs.reshape(routing_map_TE.shape)
        num_tokens = routing_map_TE.shape[0]
        routed_ET = routing_map_TE.t().reshape(-1)
        self._tokens_per_expert_E = routing_map_TE.sum(dim=0)
        num_pairs = int(self._tokens_per_expert_E.sum())  # the one host read
        # Stable: within an expert, pairs keep token order, as megatron's permutation does.
        pair_P = torch.argsort(~routed_ET, stable=True)[:num_pairs]
        self._token_of_pair_P = pair_P % num_tokens
        permuted_tokens_PH = tokens_TH.index_select(0, self._token_of_pair_P)
        permuted_probs_P = probs_TE.t().reshape(-1).index_select(0, pair_P)
        return permuted_tokens_PH, permuted_probs_P

    def token_dispatch(self, hidden_states, probs):
        return hidden_states, probs  # nothing travels: every expert is on this rank

    def dispatch_postprocess(self, hidden_states, probs):
        return hidden_states, self._tokens_per_expert_E, probs

    def combine_preprocess(self, hidden_states):
        return hidden_states

    def token_combine(self, hidden_states):
        return hidden_states

    def combine_postprocess(self, hidden_states):
        expert_output_PH = hidden_states
        num_tokens = self._input_shape.numel() // self._input_shape[-1]
        output_TH = expert_output_PH.new_zeros(num_tokens, expert_output_PH.shape[-1])
        output_TH = output_TH.index_add(0, self._token_of_pair_P, expert_output_PH)
        self._token_of_pair_P = self._tokens_per_expert_E = None
        return output_TH.view(self._input_shape)


def use_sorted_token_path(model: torch.nn.Module) -> None:
    """Put a ``SortedTokenDispatcher`` into every MoE layer of a built model, in the slot where
    megatron built the dispatcher its TransformerConfig names (``alltoall``), on the same groups.

    (megatron's transformer layer passes its process groups only to MoE layers of megatron's own
    class, so the dispatcher is swapped rather than the layer subclassed.)
    """
    for module in model.modules():
        if isinstance(module, MoELayer):
            old = module.token_dispatcher
            groups = SimpleNamespace(ep=old.ep_group, expt_tp=old.tp_group, tp_ep=old.tp_ep_group)
            module.token_dispatcher = SortedTokenDispatcher(
                config=module.config, pg_collection=groups
            )
