"""Zero-shot evaluation through lm-eval (0.4.13): the ``remoe`` model, offline tasks, Table 2.

**The model.** ``RemoeLM`` is an lm-eval ``LM`` registered as ``remoe``. It is built from

- a checkpoint written by ``pretrain_gpt.py`` (``load=<save dir>`` or one ``iter_XXXXXXX``),
  whatever TP/EP/PP/DP layout it was saved with: the model is rebuilt on one process and
  megatron-core's distributed checkpointing reshards it (``remoe_patches.inference.trained_model``);
  or
- a directory written by ``tools/export_checkpoint.py`` (``config.json`` + ``model.safetensors``),
  run by the plain-PyTorch ``remoe_patches.inference.reference_model``.

``backend=megatron|reference|auto`` (auto: reference for an export, megatron for a checkpoint;
``reference`` on a checkpoint converts it in memory). Requests are scored the way lm-eval's
Hugging Face model scores them: context + continuation are tokenized together; an empty
context is replaced by the end-of-document token; sequences longer than the model's context
(``max_length``, default the checkpoint's ``--seq-length``) are cut from the left, so the
continuation keeps its most recent ``max_length`` tokens of context; ``loglikelihood_rolling``
(perplexity) sums disjoint windows from ``lm_eval.utils.get_rolling_token_windows`` and
``make_disjoint_window`` (every token predicted exactly once, each window with a full context).
A continuation longer than ``max_length`` (which the HF model refuses) is scored in consecutive
pieces of ``max_length`` tokens, each with the ``max_length`` tokens before it as its window.
Log-probabilities are over the model's padded vocabulary, as training's cross-entropy is.
``generate_until`` is greedy (a request asking for sampling is refused), batched, stops at the
``until`` strings or the end-of-document token; its contexts are left-truncated to
``max_length - max_gen_toks`` tokens as the HF model does, and when that leaves no room (a short
context model) to ``max_length`` tokens, generation then sliding over the last ``max_length``.
Batches are sorted by length and right-padded (padding cannot reach earlier positions through
causal attention, and dropless routing treats every token on its own). Expert Choice and Lory
are the exception (their registry entries' ``routes_by_neighbours``): padding would compete with
the real tokens for an expert's places (EC's capacity is a share of the sequence, or of the
batch) or enter the mean hidden state that routes a Lory segment, and other rows would share
EC's batch groups; so these models score and generate one row per forward pass, unpadded,
whatever ``batch_size`` says, and a row's result is the one it gets alone.

**Offline tasks.** ``remoe_patches/eval/lm_eval_tasks/`` holds lm-eval task YAMLs for the paper's
seven tasks that read local files, ``DIR/<task>/<split>.jsonl`` with one JSON object per line in
the upstream Hugging Face dataset's own schema, through lm-eval's ``custom_dataset``. The
prompts, targets, choices and metrics are the upstream lm-eval 0.4.13 tasks' (the tests check
they still equal upstream's). They are ordinary lm-eval tasks: ``--include_path`` that directory
and pass ``--metadata '{"data_dir": "DIR"}'`` to lm-eval's CLI (``remoe-lm-eval``, which also
registers the ``remoe`` model), or use ``offline_task_manager(tasks, DIR)`` from Python:

=============== ============================== ================================================
task            file (evaluated split)         one row
=============== ============================== ================================================
arc_challenge   arc_challenge/test.jsonl       {"id", "question", "choices": {"text": [...],
                                               "label": [...]}, "answerKey"} (allenai/ai2_arc)
arc_easy        arc_easy/test.jsonl            as arc_challenge
boolq           boolq/validation.jsonl         {"question", "passage", "idx": int,
                                               "label": 0|1} (super_glue boolq)
hellaswag       hellaswag/validation.jsonl     {"ind", "activity_label", "ctx_a", "ctx_b", "ctx",
                                               "endings": [4 str], "source_id", "split",
                                               "split_type", "label": "0".."3" (a string)}
                                               (Rowan/hellaswag)
lambada_openai  lambada_openai/test.jsonl      {"text"}; the last word is the target
                                               (EleutherAI/lambada_openai)
piqa            piqa/validation.jsonl          {"goal", "sol1", "sol2", "label": 0|1} (baber/piqa)
race            race/test.jsonl                {"article", "problems": a string holding a Python
                                               list of {"question", "options": [4 str],
                                               "answer": "A".."D"}} (EleutherAI/race, high)
=============== ============================== ================================================

A task's other upstream splits (``train.jsonl``, ``validation.jsonl``) are optional; when
present, lm-eval draws few-shot examples from them (otherwise from the evaluated split). A
missing evaluated file is an error naming the task, the expected path and the schema.

**Table 2.** ``PAPER_TASKS`` names each task's column and the metric reported (in percent):
ARC-c acc_norm, ARC-e acc, BoolQ acc, HellaSwag acc_norm, LAMBADA acc, PIQA acc_norm, RACE acc.
The paper does not print its per-task metric; this is the usual choice for these tasks (the
normalised accuracy where lm-eval's length normalisation matters for the answer options, plain
accuracy elsewhere). lm-eval's JSON holds both acc and acc_norm wherever the task defines them.
"""

from __future__ import annotations

import difflib
import importlib.util
import inspect
import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Optional

import torch
import yaml
from tqdm import tqdm

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window, simple_parse_args_string

from remoe_patches.eval.lm_eval_tasks.functions import OFFLINE, offline_files
from remoe_patches.config.router_registry import ROUTERS

TASKS_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"

# (task, column title, metric reported) in the paper's Table 2 order.
PAPER_TASKS = (
    ("arc_challenge", "ARC-c", "acc_norm"),
    ("arc_easy", "ARC-e", "acc"),
    ("boolq", "BoolQ", "acc"),
    ("hellaswag", "HellaSwag", "acc_norm"),
    ("lambada_openai", "LAMBADA", "acc"),
    ("piqa", "PIQA", "acc_norm"),
    ("race", "RACE", "acc"),
)
DEFAULT_TASKS = tuple(task for task, _, _ in PAPER_TASKS)


# ---------------------------------------------------------------------------------------------
# lm-eval's warnings that our own offline tasks trigger by design


class _OfflineTaskWarnings(logging.Filter):
    """Drops two lm-eval warnings about our offline tasks, and only about them: that their
    ``custom_dataset`` takes ``--metadata`` (ours reads ``data_dir`` from it), and that they and
    their upstream tags override lm-eval's tasks and tags of the same name (the point of
    ``--include_path``)."""

    _tags = None

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        if message.startswith("Task '%s' from %s overrides existing task") and record.args:
            name, path = record.args[0], record.args[1]
            if path is None:  # a tag: lm-eval records no file for it
                return name not in self.offline_tags()
            return Path(str(path)).parent != TASKS_DIR
        if "Custom kwargs can be passed to `--metadata`" in message:
            return message.split(":", 1)[0] not in OFFLINE
        return True

    @classmethod
    def offline_tags(cls) -> set:
        if cls._tags is None:

            class Loader(yaml.SafeLoader):  # the tags only: no !function is imported
                pass

            Loader.add_constructor("!function", lambda loader, node: None)
            tags = set()
            for path in TASKS_DIR.glob("*.yaml"):
                tag = yaml.load(path.read_text(), Loader=Loader).get("tag") or []  # noqa: S506
                tags.update([tag] if isinstance(tag, str) else tag)
            cls._tags = tags
        return cls._tags


for _logger in ("lm_eval.api.task", "lm_eval.tasks._index"):
    logging.getLogger(_logger).addFilter(_OfflineTaskWarnings())


# ---------------------------------------------------------------------------------------------
# Task YAMLs


def load_task_yaml(path) -> dict:
    """An lm-eval task YAML as a dict: ``include:`` merged, ``!function`` resolved.

    ``!function module.name`` is ``name`` from ``module.py`` beside the YAML, as in lm-eval.
    """
    path = Path(path).resolve()

    class Loader(yaml.SafeLoader):
        pass

    def function(loader, node):
        module_name, _, name = loader.construct_scalar(node).rpartition(".")
        file = path.parent / f"{module_name.replace('.', '/')}.py"
        key = f"_lm_eval_task_functions_{abs(hash(str(file)))}"
        if key not in sys.modules:
            spec = importlib.util.spec_from_file_location(key, file)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            sys.modules[key] = module
        return getattr(sys.modules[key], name)

    Loader.add_constructor("!function", function)
    with open(path) as f:
        config = yaml.load(f, Loader=Loader)  # noqa: S506 (our Loader is a SafeLoader)
    includes = config.pop("include", None)
    if includes is None:
        return config
    merged = {}
    for include in includes if isinstance(includes, list) else [includes]:
        merged.update(load_task_yaml(path.parent / include))
    merged.update(config)
    return merged


def offline_tasks() -> tuple:
    """Tasks with an offline config shipped in ``remoe_patches/eval/lm_eval_tasks``."""
    return tuple(sorted(p.stem for p in TASKS_DIR.glob("*.yaml")))


def offline_task_manager(tasks, data_dir):
    """An lm-eval TaskManager whose ``tasks`` read ``data_dir`` (and nothing from the hub).

    Checks first that every task has offline files: FileNotFoundError naming the task, the
    expected path and the row schema, ValueError for a task without an offline config.
    """
    from lm_eval.tasks import TaskManager

    for task in tasks:
        if task not in offline_tasks():
            raise ValueError(
                f"task {task!r} has no offline config; --data-dir supports "
                f"{', '.join(offline_tasks())} (leave --data-dir out to load other tasks from "
                "the Hugging Face hub)"
            )
        offline_files(task, data_dir)
    return TaskManager(
        include_path=str(TASKS_DIR),
        include_defaults=False,
        metadata={"data_dir": str(Path(data_dir).resolve())},
    )


# ---------------------------------------------------------------------------------------------
# The lm-eval model


class ModelArgsError(ValueError):
    """A ``remoe`` model argument (``--model_args key=value``) that is missing, unknown or
    unusable; the message names it and the fix, and ``remoe-lm-eval`` prints it as one line."""


def _as_int(value, name: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ModelArgsError(f"{name} must be a positive integer, got {value!r}") from None


LOAD_HELP = (
    "a pretrain_gpt.py --save directory, one of its iter_XXXXXXX directories or a "
    "tools/export_checkpoint.py export"
)


@register_model("remoe")
class RemoeLM(TemplateLM):
    """lm-eval model for ReMoE / TopK-MoE / dense checkpoints and their exports.

    Args:
        load: a ``pretrain_gpt.py`` checkpoint directory or an exported directory.
        backend: ``megatron``, ``reference`` or ``auto`` (see the module docstring).
        batch_size: sequences per forward pass.
        max_length: context length; default the checkpoint's sequence length.
        max_gen_toks: default generation length when a request does not set one.
        device: for the reference backend (default: CUDA when available, else CPU).
        tokenizer_dir: where the tokenizer files are now, when they moved since training.
        max_batch_size: accepted from lm-eval's ``simple_evaluate`` and unused.

    From lm-eval (``--model_args``, ``simple_evaluate(model_args=...)``) an argument given in
    the model arguments wins over lm-eval's own ``--batch_size`` / ``--device``: its CLI always
    passes a batch size (1 unless ``--batch_size``), which would otherwise collide.
    """

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: Optional[dict] = None):
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: Optional[dict] = None):
        arguments = {k: v for k, v in (additional_config or {}).items() if v is not None}
        arguments.update(arg_dict)
        known = [name for name in inspect.signature(cls.__init__).parameters if name != "self"]
        for name in arg_dict:
            if name not in known:
                close = difflib.get_close_matches(name, known, n=1)
                hint = f"did you mean {close[0]}=? " if close else ""
                raise ModelArgsError(
                    f"--model_args {name}=...: the remoe model has no argument {name!r} ({hint}"
                    f"it takes {', '.join(known)})"
                )
        if "load" not in arguments:
            raise ModelArgsError(
                f"--model_args needs load=DIR ({LOAD_HELP}), e.g. --model_args load=runs/demo"
            )
        from remoe_patches.train.checkpointing import CheckpointError
        from remoe_patches.inference.trained_model import TokenizerFilesError

        try:
            return cls(**arguments)
        except TokenizerFilesError as error:
            raise ModelArgsError(
                f"load={arguments['load']}: {error.naming('tokenizer_dir=DIR in --model_args')}"
            ) from None
        except CheckpointError as error:
            raise ModelArgsError(f"load={arguments['load']}: {error}") from None

    def __init__(
        self,
        load: str,
        backend: str = "auto",
        batch_size=16,
        max_length: Optional[int] = None,
        max_gen_toks: int = 256,
        device: Optional[str] = None,
        tokenizer_dir: Optional[str] = None,
        max_batch_size=None,
    ):
        super().__init__()
        from remoe_patches.inference import hf_export, trained_model

        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise RuntimeError("RemoeLM runs on one process; launch it without torchrun")
        self.batch_size = _as_int(batch_size, "batch_size")
        if self.batch_size < 1:
            raise ModelArgsError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.load = os.fspath(load)
        if not os.path.isdir(self.load):
            raise ModelArgsError(f"load={self.load}: no such directory; load=DIR takes {LOAD_HELP}")
        is_export = hf_export.is_export_dir(self.load)
        if backend == "auto":
            backend = "reference" if is_export else "megatron"
        if backend not in ("megatron", "reference"):
            raise ModelArgsError(f"backend must be megatron, reference or auto, not {backend!r}")
        if backend == "megatron" and is_export:
            raise ModelArgsError(
                f"{self.load} is an exported model: it runs on the reference backend (or auto)"
            )
        self.model_backend = backend
        if device and device.startswith("cuda") and not torch.cuda.is_available():
            # lm-eval's CLI asks for cuda by default; its own HF model falls back the same way
            print(f" note: device {device} is not available here; using the CPU", flush=True)
            device = "cpu"
        ref_device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if is_export:
            self.model, self.tokenizer, config = hf_export.load_export_for_inference(
                self.load, device=ref_device
            )
            self.router, self.seq_length = config["router"], config["seq_length"]
            self.iteration = config.get("iteration")
        else:
            model, self.tokenizer, model_config = trained_model.load_model_for_inference(
                self.load, tokenizer_dir=tokenizer_dir
            )
            self.router, self.seq_length = model_config.router, model_config.seq_length
            self.iteration = model.checkpoint_iteration
            if backend == "reference":
                model = hf_export.reference_from_megatron(
                    model, model_config, self.tokenizer, device=ref_device
                )
            self.model = model
        self._device = next(self.model.parameters()).device
        self._max_length = _as_int(max_length, "max_length") if max_length else self.seq_length
        self._max_gen_toks = _as_int(max_gen_toks, "max_gen_toks")

    # -- what lm-eval reads ------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eod

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.eod

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.kind

    def get_model_info(self) -> dict:
        return dict(
            model_source="remoe",
            load=os.path.abspath(self.load),
            backend=self.model_backend,
            router=self.router,
            iteration=self.iteration,
            max_length=self.max_length,
            rows_per_forward=self.rows_per_forward,
        )

    @property
    def rows_per_forward(self) -> int:
        """``batch_size``, or 1 for routers that route a token by its neighbours: with one row
        per forward nothing is padded and no other row shares its routing."""
        return 1 if ROUTERS[self.router].routes_by_neighbours else self.batch_size

    def tok_encode(
        self, string: str, add_special_tokens=None, left_truncate_len=None, **kwargs
    ) -> list:
        tokens = self.tokenizer.tokenize(string)
        if left_truncate_len:
            tokens = tokens[-left_truncate_len:]
        return tokens

    def tok_decode(self, tokens) -> str:
        return self.tokenizer.detokenize(tokens)

    # -- the model ---------------------------------------------------------------------------

    @torch.no_grad()
    def logits(self, tokens_BS: torch.Tensor) -> torch.Tensor:
        """float32 logits [B, S, padded vocab] for tokens at positions 0..S-1."""
        from remoe_patches.inference.trained_model import megatron_logits

        if self.model_backend == "megatron":
            return megatron_logits(self.model, tokens_BS)
        return self.model(tokens_BS.to(self._device)).float()

    def _padded(self, rows: list) -> torch.Tensor:
        width = max(len(row) for row in rows)
        batch = torch.full((len(rows), width), self.eot_token_id, dtype=torch.long)
        for i, row in enumerate(rows):
            batch[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        return batch

    # -- scoring -----------------------------------------------------------------------------

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list:
        """``[(key, context_tokens, continuation_tokens)]`` -> ``[(logprob, is_greedy)]``."""
        # A continuation longer than the window is scored in pieces of at most max_length
        # tokens, each with the full window of tokens before it (lm-eval's HF model refuses it).
        pieces, owners = [], []
        for index, (_, context, continuation) in enumerate(requests):
            if not context or not continuation:
                raise ValueError("a loglikelihood request needs a context and a continuation")
            whole = list(context) + list(continuation)
            for start in range(len(context), len(whole), self.max_length):
                pieces.append((whole[:start], whole[start : start + self.max_length]))
                owners.append(index)
        scores = [None] * len(pieces)
        order = sorted(range(len(pieces)), key=lambda i: -(len(pieces[i][0]) + len(pieces[i][1])))
        progress = tqdm(
            total=len(requests), disable=disable_tqdm, desc="Running loglikelihood requests"
        )
        for start in range(0, len(order), self.rows_per_forward):
            chunk = order[start : start + self.rows_per_forward]
            # left-truncate: the last max_length + 1 tokens, minus the last (never an input)
            inputs = [(pieces[i][0] + pieces[i][1])[-(self.max_length + 1) :][:-1] for i in chunk]
            logprobs = torch.log_softmax(self.logits(self._padded(inputs)), dim=-1)
            for row, i in enumerate(chunk):
                continuation = pieces[i][1]
                end = len(inputs[row])
                piece = logprobs[row, end - len(continuation) : end]
                target = torch.tensor(continuation, device=piece.device)
                scores[i] = (
                    float(piece.gather(-1, target[:, None]).sum()),
                    bool((piece.argmax(dim=-1) == target).all()),
                )
            progress.update(
                sum(1 for i in chunk if i + 1 == len(owners) or owners[i + 1] != owners[i])
            )
        progress.close()
        results = [[0.0, True] for _ in requests]
        for index, (logprob, greedy) in zip(owners, scores):
            results[index][0] += logprob
            results[index][1] = results[index][1] and greedy
        results = [tuple(result) for result in results]
        for (key, _, _), answer in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list:
        windows, owners = [], []
        for index, (string,) in enumerate(req.args for req in requests):
            for context, continuation in map(
                make_disjoint_window,
                get_rolling_token_windows(
                    token_list=self.tok_encode(string),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            ):
                windows.append((None, context, continuation))
                owners.append(index)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for index, (logprob, _) in zip(owners, scores):
            totals[index] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # -- generation --------------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list:
        results = [None] * len(requests)
        groups = {}
        for i, request in enumerate(requests):
            context, gen_kwargs = request.args
            groups.setdefault(json.dumps(gen_kwargs, sort_keys=True, default=str), []).append(i)
        progress = tqdm(
            total=len(requests), disable=disable_tqdm, desc="Running generate_until requests"
        )
        for indices in groups.values():
            until, max_gen_toks = self._generation_settings(requests[indices[0]].args[1])
            room = self.max_length - max_gen_toks
            context_length = room if room > 0 else self.max_length
            encoded = {
                i: self.tok_encode(requests[i].args[0], left_truncate_len=context_length)
                for i in indices
            }
            indices = sorted(indices, key=lambda i: -len(encoded[i]))
            for start in range(0, len(indices), self.rows_per_forward):
                chunk = indices[start : start + self.rows_per_forward]
                outputs = self.greedy_generate([encoded[i] for i in chunk], max_gen_toks, until)
                for i, text in zip(chunk, outputs):
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                    progress.update(1)
        progress.close()
        return results

    def _generation_settings(self, gen_kwargs) -> tuple:
        gen_kwargs = dict(gen_kwargs or {})
        if gen_kwargs.get("do_sample") or float(gen_kwargs.get("temperature") or 0.0) > 0.0:
            raise ValueError(f"RemoeLM generates greedily only; got {gen_kwargs}")
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        max_gen_toks = _as_int(gen_kwargs.get("max_gen_toks", self.max_gen_toks), "max_gen_toks")
        return until, max_gen_toks

    def greedy_generate(self, contexts: list, max_new_tokens: int, until: list) -> list:
        """Greedy continuations (text) of token ``contexts``, cut at the first ``until`` string.

        Stops a row at the end-of-document token or when its text holds a stop string; the
        model sees the last ``max_length`` tokens of each row. Padded vocabulary entries
        (beyond the tokenizer's) are never chosen.
        """
        generated = [[] for _ in contexts]
        done = [False] * len(contexts)
        for _ in range(max_new_tokens):
            active = [i for i, finished in enumerate(done) if not finished]
            if not active:
                break
            windows = [(list(contexts[i]) + generated[i])[-self.max_length :] for i in active]
            logits = self.logits(self._padded(windows))
            for row, i in enumerate(active):
                token = int(
                    logits[row, len(windows[row]) - 1, : self.tokenizer.vocab_size].argmax()
                )
                if token == self.eot_token_id:
                    done[i] = True
                    continue
                generated[i].append(token)
                if until and any(stop in self.tok_decode(generated[i]) for stop in until):
                    done[i] = True
        texts = []
        for tokens in generated:
            text = self.tok_decode(tokens)
            for stop in until:
                if stop and stop in text:
                    text = text[: text.index(stop)]
            texts.append(text)
        return texts


# ---------------------------------------------------------------------------------------------
# Table 2


def task_metric(task: str, task_results: dict) -> Optional[str]:
    """The metric reported for ``task``: the paper's, else acc_norm or acc, else the first."""
    paper = {name: metric for name, _, metric in PAPER_TASKS}
    if task in paper:
        return paper[task]
    names = [key.split(",")[0] for key in task_results if "," in key and "_stderr" not in key]
    for candidate in ("acc_norm", "acc"):
        if candidate in names:
            return candidate
    return names[0] if names else None


def table_scores(results: dict, tasks) -> dict:
    """{task: percent (or None when missing)} from lm-eval's results, plus ``avg``."""
    scores = {}
    for task in tasks:
        task_results = results.get("results", {}).get(task, {})
        metric = task_metric(task, task_results)
        value = task_results.get(f"{metric},none") if metric else None
        scores[task] = None if value is None or value == "N/A" else 100.0 * float(value)
    values = [v for v in scores.values() if v is not None]
    scores["avg"] = sum(values) / len(values) if values and len(values) == len(tasks) else None
    return scores


def markdown_table(rows, tasks=DEFAULT_TASKS) -> str:
    """Table 2's shape: ``rows`` is [(label, lm-eval results)], one row each, plus Avg."""
    titles = {task: title for task, title, _ in PAPER_TASKS}
    header = ["Model"] + [titles.get(task, task) for task in tasks] + ["Avg."]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, results in rows:
        scores = table_scores(results, tasks)
        cells = [label] + [_cell(scores[task]) for task in list(tasks) + ["avg"]]
        lines.append("| " + " | ".join(cells) + " |")
    first_results = rows[0][1].get("results", {}) if rows else {}
    named_metrics = (
        f"{titles.get(task, task)} {task_metric(task, first_results.get(task, {}))}"
        for task in tasks
    )
    metrics = ", ".join(named_metrics) if rows else ""
    return "\n".join(lines) + f"\n\nMetrics (percent): {metrics}."


def _cell(value) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.2f}"
