"""Trained models for inference: loading, generation, the reference model and the exports (HF
Llama, remote code)."""
