"""A ReMoE export as a transformers causal LM (``trust_remote_code``): ``from_pretrained``,
``generate()`` and the loss, around the export's ``reference_model.py``.

Written into every export by ``tools/export_checkpoint.py``. The network is
``reference_model.GPT``, plain PyTorch and readable alone: LLaMA-style attention with RoPE and
grouped-query attention, RMSNorm, SwiGLU experts, and the router of the exported run (ReLU
routing for ReMoE: ``gates = ReLU(x W_r)``, every expert with a positive gate runs; softmax
top-k for TopK MoE). The weights keep the export's names, so ``model.safetensors`` loads as it
is.

**Key/value cache.** ``generate()`` keeps the transformers ``DynamicCache`` it creates (its
``update`` and ``get_seq_length`` are what the reference model calls): the prompt runs once, then
each new token alone, reading the earlier positions' keys (after RoPE) and values from the cache.
This is exact because each router here routes a token by that token alone. ``use_cache=False``
recomputes the whole context for every token. transformers 5 passes the cache as ``cache``,
transformers 4 as ``past_key_values``; either is taken, and returned under the same name.

**Padding.** ``attention_mask`` (1: token, 0: padding) masks padding as keys, and each row's
positions count from its first real token, so a left-padded batch
(``tokenizer(prompts, padding=True, padding_side="left")``) gives each row the tokens it gets
alone. Positions always come from the mask: ``position_ids`` are not read.
"""

import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_remoe import RemoeConfig
from .reference_model import GPT, GPTConfig

# The output field of the cache: ``cache`` from transformers 5, ``past_key_values`` before.
CACHE_FIELD = (
    "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
)


class RemoeForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = RemoeConfig
    base_model_prefix = "remoe"
    main_input_name = "input_ids"
    _supports_cache_class = True  # transformers 4: the model takes a Cache object

    def __init__(self, config: RemoeConfig):
        super().__init__(config)
        network = GPT(GPTConfig.from_dict(config.to_dict()))
        # The reference model's own modules, under its own names (those of model.safetensors).
        self.embedding = network.embedding
        self.decoder = network.decoder
        self.output_layer = network.output_layer
        self.post_init()

    def _init_weights(self, module):
        """Every weight comes from model.safetensors; nothing to initialise."""

    def get_input_embeddings(self):
        return self.embedding.word_embeddings

    def get_output_embeddings(self):
        return self.output_layer

    def forward(
        self,
        input_ids,
        attention_mask=None,
        labels=None,
        cache=None,
        past_key_values=None,
        use_cache=None,
        **unused,
    ):
        cache = cache if cache is not None else past_key_values
        logits = GPT.forward(self, input_ids, attention_mask=attention_mask, cache=cache)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: cache})
