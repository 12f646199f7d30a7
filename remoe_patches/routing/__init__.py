"""Routing math in plain torch, no megatron imports: one module per router kind (ReMoE's
``relu_gates`` and its ``regularizer``, ``hash_routing``, ``expert_choice_routing``,
``sparsemixer``, ``lory``), each used by its megatron adapter in ``model/routers/``."""
