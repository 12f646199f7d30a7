"""ReMoE (ReLU-routed Mixture-of-Experts) on megatron-core.

Importing the package quiets warnings that say nothing about a run, for every entry point alike
(training, evaluation, export, analysis, tests): megatron-core's import-time notices that the
optional GPU libraries transformer-engine and apex are absent (they are optional here), its own
deprecation notices, and torch's deprecation warnings for the distributed and checkpointing
APIs that megatron-core 0.16 calls.
"""

import warnings

warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")
warnings.filterwarnings("ignore", message="full scope is deprecated")
warnings.filterwarnings("ignore", category=FutureWarning, module=r"(megatron|torch\.distributed)")
warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated")
warnings.filterwarnings("ignore", message="`load_state_dict` is deprecated")
warnings.filterwarnings("ignore", message="Please use DTensor instead")
