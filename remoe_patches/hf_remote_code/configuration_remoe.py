"""The configuration of a ReMoE export for transformers (``trust_remote_code``).

Written into every export by ``tools/export_checkpoint.py``: ``config.json`` holds the fields of
``reference_model.GPTConfig`` (sizes, router kind, experts, k, rotary base, ...), which this
class keeps as attributes, plus the tokenizer's end-of-document id as ``eos_token_id``.
"""

from transformers import PretrainedConfig


class RemoeConfig(PretrainedConfig):
    """A dense, TopK-MoE or ReMoE (ReLU-routed) GPT of the ReMoE project; see config.json."""

    model_type = "remoe"

    def __init__(self, use_cache: bool = False, **kwargs):
        # The model keeps no key/value cache: generation recomputes the context each step.
        super().__init__(use_cache=use_cache, **kwargs)
