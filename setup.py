"""Install the ReMoE plug-in for megatron-core.

torch is only bounded here (megatron-core 0.16 needs >= 2.6), so that ``pip install -e .`` keeps
the CUDA torch a GPU machine already has (an NGC container, a cluster image). The exact CPU pin,
torch==2.13.0, belongs to the README's set-up (``make setup``) and CI, which install it first.
transformer-engine and NVIDIA apex are optional GPU accelerators that
megatron-core uses when importable; they are never required (the PyPI package named "apex" is
unrelated software: do not install it).
"""

from setuptools import find_packages, setup

setup(
    name="remoe",
    version="0.1.0",
    description="ReMoE (ReLU-routed Mixture-of-Experts) on megatron-core",
    python_requires=">=3.10",
    packages=find_packages(include=["remoe_patches", "remoe_patches.*"]),
    package_data={
        "remoe_patches.eval.lm_eval_tasks": ["*.yaml"],
        "remoe_patches.inference": ["hf_remote_code/*.py"],
        "remoe_patches.cli": ["megatron_lm_flags.txt"],
    },
    install_requires=[
        "torch>=2.6",
        "megatron-core==0.16.1",
        "numpy",
        "PyYAML",
        "psutil",  # megatron-core's checkpoint writer needs it but does not declare it
        "tensorboard",
        "tqdm",
        "tokenizers",
        "sentencepiece",
        "lm-eval==0.4.13",  # zero-shot evaluation (remoe_patches/eval/evaluation.py)
        "safetensors",  # checkpoint export (tools/export_checkpoint.py)
        "matplotlib",  # routing analyses (remoe_patches/analysis/routing_analyses.py)
    ],
    extras_require={
        "hf": ["transformers>=4.56"],  # loading exports with AutoModelForCausalLM
        "wandb": ["wandb>=0.19"],  # --wandb-project
        "test": ["pytest", "ruff==0.17.6", "transformers>=4.56", "wandb>=0.19"],
    },
    entry_points={"console_scripts": ["remoe-lm-eval = remoe_patches.eval.lm_eval_cli:main"]},
)
