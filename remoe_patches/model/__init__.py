"""Building megatron-core GPT models: the spec, the local layers and the token dispatcher."""
