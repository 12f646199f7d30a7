"""Weights & Biases logging, with Megatron-LM's flags (an optional extra: ``pip install
'remoe[wandb]'``).

``--wandb-project P --wandb-exp-name N`` logs the scalars TensorBoard gets (``MetricsLog``) from
the logging rank into a W&B run in ``--wandb-save-dir`` (default ``<save>/wandb``), entity
``--wandb-entity``, with the run's resolved config. The run's W&B id is kept beside its files, so
a resumed training run continues the same W&B run. ``WANDB_MODE=offline`` (W&B's own variable)
writes it for a later ``wandb sync``, as on a cluster without network.
"""

from __future__ import annotations

import importlib.util
import os
import uuid
from pathlib import Path
from typing import Optional

RUN_ID_FILE = "remoe_wandb_run_id"


def wandb_problem(logging, save: Optional[str]) -> Optional[str]:
    """What stops ``--wandb-project`` from working here (a flag or the package missing); None
    when nothing does, or without it."""
    if not logging.wandb_project:
        return None
    if not logging.wandb_exp_name:
        return "--wandb-project needs --wandb-exp-name (the run's name in W&B), as in Megatron-LM"
    if not (logging.wandb_save_dir or save):
        return "--wandb-project needs --save or --wandb-save-dir (where W&B writes the run)"
    if importlib.util.find_spec("wandb") is None:
        return (
            "--wandb-project needs the wandb package: pip install 'remoe[wandb]' (or "
            "wandb), or drop the W&B flags"
        )
    return None


def save_dir(logging, save: Optional[str]) -> str:
    return logging.wandb_save_dir or os.path.join(save, "wandb")


def open_wandb_run(logging, *, save: Optional[str], config: dict):
    """The W&B run to log into (the one this directory logged into before, if any), or None
    without ``--wandb-project``. Call on the logging rank only."""
    if not logging.wandb_project:
        return None
    import wandb

    directory = Path(save_dir(logging, save))
    directory.mkdir(parents=True, exist_ok=True)
    id_file = directory / RUN_ID_FILE
    if id_file.is_file():
        run_id = id_file.read_text().strip()
    else:
        run_id = uuid.uuid4().hex[:8]  # W&B's own id form: 8 of [a-z0-9]
        id_file.write_text(run_id + "\n")
    return wandb.init(
        dir=str(directory),
        project=logging.wandb_project,
        name=logging.wandb_exp_name,
        entity=logging.wandb_entity or None,
        id=run_id,
        resume="allow",
        config=config,
    )
