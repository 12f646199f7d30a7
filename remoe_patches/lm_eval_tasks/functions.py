"""The upstream lm-eval tasks' Python helpers, for the ``!function`` entries of these YAMLs.

Imported, not copied, so the offline tasks process documents exactly as upstream does.
"""

from lm_eval.tasks.hellaswag.utils import process_docs as hellaswag_process_docs  # noqa: F401
from lm_eval.tasks.race.preprocess_race import (  # noqa: F401
    doc_to_choice as race_doc_to_choice,
    doc_to_target as race_doc_to_target,
    doc_to_text as race_doc_to_text,
)
