"""Routing math in plain torch (ReMoE's ReLU gates and regularizer, the Table 2 baselines'
routing): no megatron imports."""
