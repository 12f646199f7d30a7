"""The command line of ``pretrain_gpt.py``: Megatron-LM's flags, their checks, mapping and notes,
and the entry point."""
