"""The process and megatron-core runtime: torch.distributed and parallel groups, CPU shims,
megatron-core fixes, host-sync counting."""
