"""Zero-shot evaluation through lm-eval: the ``remoe`` model, its CLI and the offline task files."""
