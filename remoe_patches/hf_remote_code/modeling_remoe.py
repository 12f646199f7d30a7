"""A ReMoE export as a transformers causal LM (``trust_remote_code``): ``from_pretrained``,
``generate()`` and the loss, around the export's ``reference_model.py``.

Written into every export by ``tools/export_checkpoint.py``. The network is
``reference_model.GPT``, plain PyTorch and readable alone: LLaMA-style attention with RoPE and
grouped-query attention, RMSNorm, SwiGLU experts, and the router of the exported run (ReLU
routing for ReMoE: ``gates = ReLU(x W_r)``, every expert with a positive gate runs; softmax
top-k for TopK MoE). The weights keep the export's names, so ``model.safetensors`` loads as it
is. There is no key/value cache (each generated token recomputes the context) and no padding
mask: generate one prompt at a time, or batches of equal length.
"""

import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from .configuration_remoe import RemoeConfig
from .reference_model import GPT, GPTConfig


class RemoeForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = RemoeConfig
    base_model_prefix = "remoe"
    main_input_name = "input_ids"

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

    def forward(self, input_ids, attention_mask=None, labels=None, **unused):
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("RemoeForCausalLM has no padding mask: pass unpadded sequences")
        logits = GPT.forward(self, input_ids)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                                   labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutput(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **unused):
        return {"input_ids": input_ids, "attention_mask": attention_mask}
