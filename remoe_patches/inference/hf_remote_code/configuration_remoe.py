"""The configuration of a ReMoE export for transformers (``trust_remote_code``).

Written into every export by ``tools/export_checkpoint.py``: ``config.json`` holds the fields of
``reference_model.GPTConfig`` (sizes, router kind, experts, k, rotary base, ...), which this
class keeps as attributes, plus the tokenizer's end-of-document id as ``eos_token_id``.
``num_hidden_layers`` is transformers' name for ``num_layers`` (its caches read it).
"""

from transformers import PretrainedConfig


class RemoeConfig(PretrainedConfig):
    """A dense, TopK-MoE or ReMoE (ReLU-routed) GPT of the ReMoE project; see config.json."""

    model_type = "remoe"
    attribute_map = {"num_hidden_layers": "num_layers"}

    def __init__(self, use_cache: bool = True, **kwargs):
        # generate() keeps a key/value cache unless use_cache is False (modeling_remoe.py)
        super().__init__(use_cache=use_cache, **kwargs)
