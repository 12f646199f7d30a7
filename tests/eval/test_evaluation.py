"""Zero-shot evaluation through lm-eval: the ``remoe`` model, offline tasks, tools/evaluate.py.

The checkpoints are trained once per session (``trained_checkpoints.py``).
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


from trained_checkpoints import SEQ, checkpoint, clean_env
from training_runs import REPO


# ---------------------------------------------------------------------------------------------
# Checkpoints


@pytest.fixture(scope="module")
def relu_checkpoint(tmp_path_factory):
    return checkpoint(tmp_path_factory, "relu")


@pytest.fixture(scope="module")
def relu_lm(single_rank, relu_checkpoint):
    from remoe_patches.eval.evaluation import RemoeLM

    return RemoeLM(load=relu_checkpoint, batch_size=3)


# ---------------------------------------------------------------------------------------------
# Direct computations the lm-eval model is checked against


def direct_logprobs(lm, tokens: list) -> torch.Tensor:
    """log-probabilities [len(tokens), vocab] of one unpadded sequence, one forward pass."""
    from remoe_patches.inference.trained_model import megatron_logits

    logits = megatron_logits(lm.model, torch.tensor([tokens]))[0]
    return torch.log_softmax(logits, dim=-1)


def direct_score(lm, inputs: list, targets: list) -> tuple:
    """Sum of log p(target) over the last len(targets) positions of ``inputs``, and greedy."""
    logprobs = direct_logprobs(lm, inputs)[len(inputs) - len(targets) :]
    target = torch.tensor(targets)
    return (
        float(logprobs.gather(-1, target[:, None]).sum()),
        bool((logprobs.argmax(-1) == target).all()),
    )


def requests(kind, args_list):
    from lm_eval.api.instance import Instance

    return [
        Instance(request_type=kind, doc={}, arguments=args, idx=i)
        for i, args in enumerate(args_list)
    ]


LONG_TEXT = (
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n    a, b = 0, 1\n'
    "    for _ in range(n):\n        a, b = b, a + b\n    return a\n\n"
    "The module defines classes and functions; the reader should consult the documentation "
    "of each before use, since the arguments are checked at run time.\n"
)


# ---------------------------------------------------------------------------------------------
# loglikelihood, rolling, generation


@pytest.mark.integration
def test_loglikelihood_equals_direct_forward_sum(relu_lm):
    lm = relu_lm
    pairs = [
        ("The value of", " the function"),
        ("import os\nimport", " sys"),
        ("", "def main():"),  # empty context: the end-of-document token stands in
        (LONG_TEXT, " return None"),  # context longer than the window: left-truncated
        ("Answer:", LONG_TEXT),  # continuation longer than the window: scored in pieces
        ("x =", " 1"),
    ]
    got = lm.loglikelihood(requests("loglikelihood", pairs), disable_tqdm=True)
    assert len(lm.tok_encode(LONG_TEXT)) > 2 * SEQ
    L = lm.max_length
    assert L == SEQ
    for (context, continuation), (logprob, greedy) in zip(pairs, got):
        if context:
            context_tokens, continuation_tokens = lm._encode_pair(context, continuation)
        else:
            context_tokens, continuation_tokens = [lm.eot_token_id], lm.tok_encode(continuation)
        whole = context_tokens + continuation_tokens
        expected, expected_greedy = 0.0, True
        # the continuation in pieces of at most L tokens, each predicted from the L tokens
        # before its last token (one piece unless the continuation is longer than L)
        for start in range(len(context_tokens), len(whole), L):
            end = min(start + L, len(whole))
            window = whole[max(0, end - 1 - L) : end - 1]
            score, is_greedy = direct_score(lm, window, whole[start:end])
            expected += score
            expected_greedy = expected_greedy and is_greedy
        assert logprob == pytest.approx(expected, rel=1e-5, abs=1e-5), (context, continuation)
        assert greedy == expected_greedy
        assert logprob < 0


@pytest.mark.integration
def test_short_request_is_one_plain_forward_pass(relu_lm):
    lm = relu_lm
    context, continuation = lm._encode_pair("for item in", " items:")
    [(logprob, _)] = lm.loglikelihood(
        requests("loglikelihood", [("for item in", " items:")]), disable_tqdm=True
    )
    logprobs = direct_logprobs(lm, context + continuation)
    expected = sum(
        float(logprobs[len(context) - 1 + i, token]) for i, token in enumerate(continuation)
    )
    assert logprob == pytest.approx(expected, rel=1e-5)


@pytest.mark.integration
def test_loglikelihood_rolling_equals_whole_text_sum(relu_lm):
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    lm = relu_lm
    short_text = "import os\nprint(os.getcwd())\n"
    texts = [short_text, LONG_TEXT, LONG_TEXT[:90]]
    got = lm.loglikelihood_rolling(
        requests("loglikelihood_rolling", [(t,) for t in texts]), disable_tqdm=True
    )

    # a text within the window: the sum over all its tokens, given the end-of-document token
    tokens = lm.tok_encode(short_text)
    assert len(tokens) < SEQ
    logprobs = direct_logprobs(lm, [lm.eot_token_id] + tokens[:-1])
    assert got[0] == pytest.approx(
        float(logprobs.gather(-1, torch.tensor(tokens)[:, None]).sum()), rel=1e-5
    )

    # longer texts: the same rolling windows, computed one by one without batching
    for text, value in zip(texts[1:], got[1:]):
        tokens = lm.tok_encode(text)
        assert len(tokens) > SEQ
        windows = [
            make_disjoint_window(w)
            for w in get_rolling_token_windows(
                token_list=tokens, prefix_token=lm.eot_token_id, max_seq_len=SEQ, context_len=1
            )
        ]
        assert sum((w[1] for w in windows), []) == tokens  # every token predicted exactly once
        assert len(windows) > 1
        expected = sum(direct_score(lm, (c + t)[-(SEQ + 1) :][:-1], t)[0] for c, t in windows)
        assert value == pytest.approx(expected, rel=1e-5)


@pytest.mark.integration
def test_reference_backend_scores_like_megatron(relu_lm, relu_checkpoint):
    from remoe_patches.eval.evaluation import RemoeLM

    reference = RemoeLM(load=relu_checkpoint, backend="reference", batch_size=2)
    pairs = [("The value of", " the function"), (LONG_TEXT, " return None"), ("", "import os")]
    a = relu_lm.loglikelihood(requests("loglikelihood", pairs), disable_tqdm=True)
    b = reference.loglikelihood(requests("loglikelihood", pairs), disable_tqdm=True)
    assert [x[0] for x in b] == pytest.approx([x[0] for x in a], rel=1e-5)
    rolling = requests("loglikelihood_rolling", [(LONG_TEXT,)])
    assert reference.loglikelihood_rolling(rolling, disable_tqdm=True) == pytest.approx(
        relu_lm.loglikelihood_rolling(rolling, disable_tqdm=True), rel=1e-5
    )


@pytest.mark.integration
def test_a_dense_llama_export_scores_like_its_checkpoint(single_rank, tmp_path_factory, tmp_path):
    from remoe_patches.eval.evaluation import RemoeLM
    from remoe_patches.inference.hf_export import export_checkpoint

    load = checkpoint(tmp_path_factory, "dense")
    export = export_checkpoint(load, str(tmp_path / "export"))
    assert json.loads((Path(export) / "config.json").read_text())["model_type"] == "llama"
    exported, megatron = RemoeLM(load=export, batch_size=2), RemoeLM(load=load, batch_size=2)
    info = exported.get_model_info()
    assert (info["backend"], info["router"], info["iteration"]) == ("reference", "dense", 3)
    assert exported.max_length == SEQ
    pairs = [("The value of", " the function"), (LONG_TEXT, " return None"), ("", "import os")]
    a = megatron.loglikelihood(requests("loglikelihood", pairs), disable_tqdm=True)
    b = exported.loglikelihood(requests("loglikelihood", pairs), disable_tqdm=True)
    assert [x[0] for x in b] == pytest.approx([x[0] for x in a], rel=1e-5)
    assert [x[1] for x in b] == [x[1] for x in a]
    rolling = requests("loglikelihood_rolling", [(LONG_TEXT,)])
    assert exported.loglikelihood_rolling(rolling, disable_tqdm=True) == pytest.approx(
        megatron.loglikelihood_rolling(rolling, disable_tqdm=True), rel=1e-5
    )


@pytest.mark.integration
def test_generate_until_is_greedy(relu_lm):
    lm = relu_lm
    prompts = [
        ("def main():\n", {"until": ["\n\n"], "max_gen_toks": 6}),
        ("import", {"until": ["zzz"], "max_gen_toks": 6}),
        (LONG_TEXT, {"until": ["zzz"], "max_gen_toks": SEQ + 8}),
    ]  # slides past the window
    got = lm.generate_until(requests("generate_until", prompts), disable_tqdm=True)
    vocab = lm.tokenizer.vocab_size
    for (context, kwargs), text in zip(prompts, got):
        n, stop = kwargs["max_gen_toks"], kwargs["until"][0]
        room = SEQ - n
        tokens = lm.tok_encode(context)
        tokens = tokens[-(room if room > 0 else SEQ) :]
        generated = []
        for _ in range(n):
            logits = direct_logprobs(lm, (tokens + generated)[-SEQ:])[-1, :vocab]
            token = int(logits.argmax())
            if token == lm.eot_token_id:
                break
            generated.append(token)
            if stop in lm.tok_decode(generated):
                break
        expected = lm.tok_decode(generated).split(stop)[0]
        assert text == expected
    assert len(lm.tok_encode(got[2])) > 0
    with pytest.raises(ValueError, match="greedily"):
        lm.generate_until(
            requests("generate_until", [("x", {"do_sample": True})]), disable_tqdm=True
        )


# ---------------------------------------------------------------------------------------------
# Checkpoints saved under EP=2 / TP=2


@pytest.mark.integration
@pytest.mark.parametrize(
    "name, key, size",
    [("relu-ep2", "expert_model_parallel_size", 2), ("relu-tp2", "tensor_model_parallel_size", 2)],
)
def test_sharded_checkpoint_evaluates_like_single_process(
    single_rank, relu_lm, tmp_path_factory, name, key, size
):
    from remoe_patches.eval.evaluation import RemoeLM
    from remoe_patches.train.checkpointing import read_checkpoint_state, resolve_checkpoint_dir

    directory = resolve_checkpoint_dir(checkpoint(tmp_path_factory, name))
    saved = read_checkpoint_state(directory)["run_config"]["parallel"]
    assert saved[key] == size
    # both ranks wrote shards of the model
    assert {p.name.split("_")[2] for p in Path(directory).glob("__*_*.distcp")} == {"0", "1"}

    sharded = RemoeLM(load=directory, batch_size=3)
    assert sharded.model.config.tensor_model_parallel_size == 1
    expected_state = relu_lm.model.state_dict()
    got_state = sharded.model.state_dict()
    tensors = [k for k, v in expected_state.items() if torch.is_tensor(v)]
    assert [k for k, v in got_state.items() if torch.is_tensor(v)] == tensors
    assert expected_state["embedding.word_embeddings.weight"].shape[0] == 512
    for name_ in tensors:
        assert torch.equal(got_state[name_], expected_state[name_]), name_

    pairs = [("The value of", " the function"), (LONG_TEXT, " return None"), ("", "import os")]
    assert sharded.loglikelihood(
        requests("loglikelihood", pairs), disable_tqdm=True
    ) == relu_lm.loglikelihood(requests("loglikelihood", pairs), disable_tqdm=True)
    rolling = requests("loglikelihood_rolling", [(LONG_TEXT,)])
    assert sharded.loglikelihood_rolling(
        rolling, disable_tqdm=True
    ) == relu_lm.loglikelihood_rolling(rolling, disable_tqdm=True)


# ---------------------------------------------------------------------------------------------
# Offline tasks


def write_fixtures(data_dir: Path) -> dict:
    """4 made-up rows per task in each upstream dataset's schema; {task: rows written}."""

    def arc(prefix):
        return [
            dict(
                id=f"{prefix}-{i}",
                question=q,
                choices=dict(text=choices, label=labels),
                answerKey=answer,
            )
            for i, (q, choices, labels, answer) in enumerate(
                [
                    (
                        "Which tool measures temperature?",
                        ["ruler", "thermometer", "scale", "clock"],
                        ["A", "B", "C", "D"],
                        "B",
                    ),
                    (
                        "What do plants need to make food?",
                        ["sunlight", "sand", "salt"],
                        ["A", "B", "C"],
                        "A",
                    ),
                    (
                        "Which is a liquid at room temperature?",
                        ["iron", "water", "wood", "ice"],
                        ["1", "2", "3", "4"],
                        "2",
                    ),
                    (
                        "What pulls objects toward the ground?",
                        ["magnetism", "friction", "gravity", "light"],
                        ["A", "B", "C", "D"],
                        "C",
                    ),
                ]
            )
        ]

    def problems(items):
        return str([dict(question=q, options=o, answer=a) for q, o, a in items])

    rows = {
        "arc_easy": ("test", arc("easy")),
        "arc_challenge": ("test", arc("challenge")),
        "boolq": (
            "validation",
            [
                dict(
                    question="is the sky blue on a clear day",
                    passage="On a clear day the sky "
                    "looks blue because air scatters blue light more than red light.",
                    idx=0,
                    label=1,
                ),
                dict(
                    question="do fish breathe air with lungs",
                    passage="Most fish take oxygen from water through their gills.",
                    idx=1,
                    label=0,
                ),
                dict(
                    question="is python a programming language",
                    passage="Python is a programming language that emphasises readability.",
                    idx=2,
                    label=1,
                ),
                dict(
                    question="does ice sink in water",
                    passage="Ice is less dense than liquid water, so it floats.",
                    idx=3,
                    label=0,
                ),
            ],
        ),
        "hellaswag": (
            "validation",
            [
                dict(
                    ind=i,
                    activity_label=activity,
                    ctx_a=ctx_a,
                    ctx_b=ctx_b,
                    ctx=f"{ctx_a} {ctx_b}",
                    endings=endings,
                    source_id=f"src-{i}",
                    split="val",
                    split_type="indomain",
                    label=label,
                )
                for i, (activity, ctx_a, ctx_b, endings, label) in enumerate(
                    [
                        (
                            "Cooking",
                            "A man cracks eggs into a bowl.",
                            "he",
                            [
                                "whisks them with a fork.",
                                "paints the wall.",
                                "drives to work.",
                                "reads a map.",
                            ],
                            "0",
                        ),
                        (
                            "Running",
                            "A woman ties her shoes at the track.",
                            "she",
                            [
                                "sings an opera.",
                                "starts jogging around the lane.",
                                "bakes bread.",
                                "opens a bank account.",
                            ],
                            "1",
                        ),
                        (
                            "Gardening",
                            "A boy kneels by a flower bed.",
                            "he",
                            [
                                "flies a plane.",
                                "writes a novel.",
                                "pulls out the weeds.",
                                "swims a lap.",
                            ],
                            "2",
                        ),
                        (
                            "Home [title] How to clean a window",
                            "[step] Spray the glass.",
                            "then",
                            [
                                "eat the cloth.",
                                "call a taxi.",
                                "sleep on it.",
                                "wipe it with a cloth.",
                            ],
                            "3",
                        ),
                    ]
                )
            ],
        ),
        "lambada_openai": (
            "test",
            [
                dict(text="She opened the door and let the cat out into the garden"),
                dict(text="He wrote the function, ran the tests and fixed the last bug"),
                dict(text="The train left the station at noon and arrived in the city"),
                dict(text="After the rain stopped the children went outside to play"),
            ],
        ),
        "piqa": (
            "validation",
            [
                dict(
                    goal="To dry wet hands,",
                    sol1="rub them with a towel.",
                    sol2="put them in the freezer.",
                    label=0,
                ),
                dict(
                    goal="To open a jar,",
                    sol1="hit it with a book.",
                    sol2="twist the lid counterclockwise.",
                    label=1,
                ),
                dict(
                    goal="To cool soup,",
                    sol1="let it rest for a few minutes.",
                    sol2="add boiling water.",
                    label=0,
                ),
                dict(
                    goal="To read at night,",
                    sol1="close your eyes.",
                    sol2="turn on a lamp.",
                    label=1,
                ),
            ],
        ),
        "race": (
            "test",
            [
                dict(
                    article="Tom likes to read books in the library after school. He borrows "
                    "two books every week.",
                    problems=problems(
                        [
                            (
                                "Where does Tom read?",
                                ["At home", "In the library", "In a park", "On a bus"],
                                "B",
                            ),
                            (
                                "How many books does Tom borrow every week?",
                                ["One", "Two", "Three", "Four"],
                                "B",
                            ),
                        ]
                    ),
                ),
                dict(
                    article="The museum opens at nine and closes at five. Children enter for free.",
                    problems=problems(
                        [
                            (
                                "The museum closes at  _  .",
                                ["nine", "five", "noon", "midnight"],
                                "B",
                            ),
                            (
                                "Who enters for free?",
                                ["Teachers", "Children", "Doctors", "Nobody"],
                                "B",
                            ),
                        ]
                    ),
                ),
                dict(
                    article="Rain fell all night, so the river rose and covered the road.",
                    problems=problems(
                        [("Why did the river rise?", ["Rain", "Snow", "Wind", "Sun"], "A")]
                    ),
                ),
            ],
        ),
    }
    for task, (split, items) in rows.items():
        (data_dir / task).mkdir(parents=True)
        with open(data_dir / task / f"{split}.jsonl", "w") as f:
            for item in items:
                f.write(json.dumps(item) + "\n")
    return {task: len(items) for task, (_, items) in rows.items()}


UPSTREAM_YAMLS = {
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
    "boolq": "super_glue/boolq/default.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
    "lambada_openai": "lambada/lambada_openai.yaml",
    "piqa": "piqa/piqa.yaml",
    "race": "race/race.yaml",
}


def _comparable(config: dict) -> dict:
    out = {}
    for key, value in config.items():
        if key in ("dataset_path", "dataset_name", "dataset_kwargs", "custom_dataset"):
            continue
        out[key] = (value.__name__, inspect.getsource(value)) if callable(value) else value
    return out


@pytest.mark.parametrize("task", list(UPSTREAM_YAMLS))
def test_offline_task_equals_upstream_prompts_and_metrics(task):
    import lm_eval.tasks

    from remoe_patches.eval.evaluation import TASKS_DIR, load_task_yaml

    upstream = load_task_yaml(Path(lm_eval.tasks.__file__).parent / UPSTREAM_YAMLS[task])
    mine = load_task_yaml(TASKS_DIR / f"{task}.yaml")
    assert _comparable(mine) == _comparable(upstream)
    assert mine["dataset_path"] == "json" and mine["dataset_name"] is None


def test_offline_dataset_reads_the_data_dir(tmp_path):
    from remoe_patches.eval.evaluation import DEFAULT_TASKS, TASKS_DIR, load_task_yaml
    from remoe_patches.eval.lm_eval_tasks.functions import offline_dataset

    counts = write_fixtures(tmp_path)
    (tmp_path / "boolq" / "train.jsonl").write_text(
        (tmp_path / "boolq" / "validation.jsonl").read_text().splitlines()[0] + "\n"
    )
    boolq = offline_dataset("boolq", data_dir=str(tmp_path), version=2.0)
    assert (len(boolq["train"]), len(boolq["validation"])) == (1, counts["boolq"])
    piqa = offline_dataset("piqa", data_dir=str(tmp_path))
    # no training file: the training split is the evaluated one (lm-eval's own fallback)
    assert piqa["train"]["goal"] == piqa["validation"]["goal"]
    # the task YAMLs name their own task for the loader, and nothing lm-eval does not know
    for task in DEFAULT_TASKS:
        config = load_task_yaml(TASKS_DIR / f"{task}.yaml")
        assert config["dataset_kwargs"] == {"remoe_task": task}
        assert (
            config["custom_dataset"] is offline_dataset
            or config["custom_dataset"].__name__ == "offline_dataset"
        )
    with pytest.raises(ValueError, match="no offline files"):
        offline_dataset("mmlu", data_dir=str(tmp_path))


def test_missing_file_or_data_dir_names_what_to_do(tmp_path, monkeypatch):
    from remoe_patches.eval.evaluation import offline_task_manager
    from remoe_patches.eval.lm_eval_tasks.functions import offline_dataset

    (tmp_path / "hellaswag").mkdir()
    with pytest.raises(FileNotFoundError) as error:
        offline_task_manager(["piqa", "hellaswag"], tmp_path)
    message = str(error.value)
    assert "task piqa" in message
    assert str(tmp_path / "piqa" / "validation.jsonl") in message
    assert '"goal": str, "sol1": str, "sol2": str, "label": int' in message
    with pytest.raises(ValueError, match="has no offline config"):
        offline_task_manager(["mmlu"], tmp_path)
    monkeypatch.delenv("REMOE_ZERO_SHOT_DIR", raising=False)
    with pytest.raises(ValueError, match="--metadata .*data_dir.* or set REMOE_ZERO_SHOT_DIR"):
        offline_dataset("piqa")


def _evaluate_tool():
    spec = importlib.util.spec_from_file_location("evaluate_tool", REPO / "tools" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_evaluate_tool_reports_a_missing_file(tmp_path, capsys):
    write_fixtures(tmp_path)
    (tmp_path / "race" / "test.jsonl").unlink()
    code = _evaluate_tool().main(["--load", str(tmp_path), "--data-dir", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err
    assert "task race" in err and str(tmp_path / "race" / "test.jsonl") in err
    assert '"article": str' in err


def test_markdown_table_has_the_papers_columns():
    from remoe_patches.eval.evaluation import DEFAULT_TASKS, markdown_table

    values = {
        "arc_challenge": 0.2,
        "arc_easy": 0.4,
        "boolq": 0.5,
        "hellaswag": 0.3,
        "lambada_openai": 0.1,
        "piqa": 0.6,
        "race": 0.3,
    }
    results = {
        "results": {t: {"acc,none": v, "acc_norm,none": v + 0.01} for t, v in values.items()}
    }
    partial = {"results": {t: r for t, r in results["results"].items() if t != "race"}}
    lines = markdown_table([("ReMoE", results), ("MoE", partial)], DEFAULT_TASKS).splitlines()
    assert lines[0] == (
        "| Model | ARC-c | ARC-e | BoolQ | HellaSwag | LAMBADA | PIQA | RACE | Avg. |"
    )
    # acc_norm for ARC-c, HellaSwag and PIQA, acc elsewhere
    assert lines[2] == "| ReMoE | 21.00 | 40.00 | 50.00 | 31.00 | 10.00 | 61.00 | 30.00 | 34.71 |"
    assert lines[3].endswith("| 61.00 | n/a | n/a |")


@pytest.mark.integration
def test_evaluate_tool_end_to_end(single_rank, relu_checkpoint, tmp_path):
    from remoe_patches.eval.evaluation import PAPER_TASKS
    from remoe_patches.inference.hf_export import export_checkpoint

    data = tmp_path / "data"
    counts = write_fixtures(data)
    exported = export_checkpoint(relu_checkpoint, str(tmp_path / "exported"))
    output = tmp_path / "out" / "results.json"
    env = clean_env(HF_HOME=str(tmp_path / "hf"))
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "evaluate.py"),
            "--load",
            relu_checkpoint,
            "--load",
            exported,
            "--data-dir",
            str(data),
            "--batch-size",
            "8",
            "--output",
            str(output),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Running loglikelihood requests" in result.stderr  # the progress bar

    lines = result.stdout.splitlines()
    header = lines.index(
        "| Model | ARC-c | ARC-e | BoolQ | HellaSwag | LAMBADA | PIQA | RACE | Avg. |"
    )
    rows = [line.strip("|").split("|") for line in lines[header + 2 : header + 4]]
    assert [row[0].strip() for row in rows] == ["ReMoE (relu)", "ReMoE (exported)"]
    for index, row in enumerate(rows):
        results = json.loads((tmp_path / "out" / f"results.{index + 1}.json").read_text())
        cells = [float(cell) for cell in row[1:]]
        assert len(cells) == 8
        for (task, _, metric), cell in zip(PAPER_TASKS, cells):
            task_results = results["results"][task]
            assert cell == pytest.approx(100 * task_results[f"{metric},none"], abs=0.006)
            assert "acc,none" in task_results
            assert 0.0 <= task_results["acc,none"] <= 1.0
            assert results["n-samples"][task]["effective"] == counts[task]
        assert cells[-1] == pytest.approx(sum(cells[:-1]) / 7, abs=0.01)
        assert results["results"]["lambada_openai"]["perplexity,none"] > 1.0
        assert results["config"]["router"] == "relu"
    assert rows[0][1:] == rows[1][1:]  # megatron and the exported reference model agree
    first = json.loads((tmp_path / "out" / "results.1.json").read_text())
    assert first["config"]["backend"] == "megatron"
    assert (
        json.loads((tmp_path / "out" / "results.2.json").read_text())["config"]["backend"]
        == "reference"
    )
    assert first["configs"]["race"]["metadata"]["data_dir"] == str(data.resolve())


def lm_eval_cli(*argv, env):
    return subprocess.run(
        [sys.executable, "-m", "remoe_patches.eval.lm_eval_cli", *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )


@pytest.mark.integration
def test_lm_evals_own_cli_runs_the_remoe_model_on_offline_tasks(relu_checkpoint, tmp_path):
    data = tmp_path / "data"
    counts = write_fixtures(data)
    env = clean_env(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    common = [
        "--model",
        "remoe",
        "--model_args",
        f"load={relu_checkpoint}",
        "--tasks",
        "piqa,arc_easy",
        "--batch_size",
        "4",
    ]
    # the shortcut, and lm-eval's own flags for the same thing
    short = lm_eval_cli(
        *common, "--data_dir", str(data), "--output_path", str(tmp_path / "short"), env=env
    )
    native = lm_eval_cli(
        *common,
        "--include_path",
        str(REPO / "remoe_patches" / "eval" / "lm_eval_tasks"),
        "--metadata",
        json.dumps({"data_dir": str(data)}),
        "--output_path",
        str(tmp_path / "native"),
        env=env,
    )
    results = []
    for result, name in ((short, "short"), (native, "native")):
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        (path,) = (tmp_path / name).rglob("results_*.json")
        results.append(json.loads(path.read_text()))
        assert "|piqa" in result.stdout  # lm-eval's own table
    for task in ("piqa", "arc_easy"):
        assert results[0]["n-samples"][task]["effective"] == counts[task]
        assert results[0]["results"][task] == results[1]["results"][task]


@pytest.mark.integration
def test_evaluate_without_data_dir_and_network_says_so_in_one_line(relu_checkpoint, tmp_path):
    env = clean_env(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "evaluate.py"),
            "--load",
            relu_checkpoint,
            "--tasks",
            "piqa",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("evaluate.py")]
    assert len(errors) == 1 and "there is no network here; pass --data-dir DIR" in errors[0]
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------------------------------------
# The README's commands, as written; what a wrong argument or task file says


def readme_blocks(section: str) -> list:
    """``(language, text)`` of each fenced code block under the README heading ``section``."""
    text = (REPO / "README.md").read_text()
    start = text.index(f"\n## {section}\n")
    end = text.find("\n## ", start + 1)
    blocks, language, lines = [], None, None
    for line in text[start : end if end > 0 else None].splitlines():
        if line.startswith("```") and lines is None:
            language, lines = line[3:].strip(), []
        elif line.startswith("```"):
            blocks.append((language, "\n".join(lines)))
            lines = None
        elif lines is not None:
            lines.append(line)
    return blocks


@pytest.mark.integration
def test_readme_zero_shot_commands_run_as_written(relu_checkpoint, tmp_path):
    """Every block of "Zero-shot evaluation and export", unchanged, in a directory where
    ``runs/demo`` is a checkpoint, ``DIR`` the task files and ``tools`` this repository's."""
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "demo").symlink_to(relu_checkpoint)
    (tmp_path / "tools").symlink_to(REPO / "tools")
    counts = write_fixtures(tmp_path / "DIR")
    (tmp_path / "prompts.jsonl").write_text('"def add(a, b):"\n"import "\n')  # --prompt-file
    env = clean_env(
        HF_HOME=str(tmp_path / "hf"),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    )
    blocks = readme_blocks("Zero-shot evaluation and export")
    assert [language for language, _ in blocks] == ["bash", "bash", "python", "python", "bash"]
    outputs = []
    for language, block in blocks:
        command = (
            ["bash", "-euo", "pipefail", "-c", block]
            if language == "bash"
            else ["python", "-c", block]
        )
        result = subprocess.run(
            command, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env
        )
        assert result.returncode == 0, block + "\n" + result.stdout[-3000:] + result.stderr[-3000:]
        outputs.append(result)
    assert (
        json.loads((tmp_path / "results.json").read_text())["n-samples"]["piqa"]["effective"]
        == counts["piqa"]
    )
    assert (tmp_path / "export" / "demo" / "model.safetensors").is_file()
    (lm_eval_results,) = (tmp_path / "results").rglob("results_*.json")
    lm_eval_results = json.loads(lm_eval_results.read_text())
    assert set(lm_eval_results["results"]) == {"arc_easy", "piqa"}
    # lm-eval's warnings about our own task registration are expected and not printed
    assert "Custom kwargs" not in outputs[1].stderr
    assert "overrides existing task" not in outputs[1].stderr
    assert outputs[4].stdout.startswith("def fibonacci(n):")


@pytest.mark.integration
def test_model_args_win_over_lm_evals_batch_size(relu_checkpoint):
    from remoe_patches.eval.evaluation import RemoeLM

    lm_eval_cli_defaults = {"batch_size": 1, "max_batch_size": None, "device": None}
    lm = RemoeLM.create_from_arg_string(
        f"load={relu_checkpoint},batch_size=16", lm_eval_cli_defaults
    )
    assert lm.batch_size == 16
    assert (
        RemoeLM.create_from_arg_string(f"load={relu_checkpoint}", {"batch_size": 4}).batch_size == 4
    )


@pytest.mark.integration
def test_wrong_model_args_say_which_and_what_to_do(relu_checkpoint, tmp_path):
    from remoe_patches.eval.evaluation import ModelArgsError, RemoeLM

    with pytest.raises(ModelArgsError, match=r"--model_args lod=\.\.\.: .*did you mean load=\?"):
        RemoeLM.create_from_arg_string(f"lod={relu_checkpoint}", {"batch_size": 1})
    with pytest.raises(ModelArgsError, match=r"--model_args needs load=DIR"):
        RemoeLM.create_from_arg_string("batch_size=16", {"batch_size": 1})
    with pytest.raises(ModelArgsError, match=r"load=runs/nowhere: no such directory"):
        RemoeLM.create_from_arg_string("load=runs/nowhere")
    with pytest.raises(ModelArgsError, match=rf"load={tmp_path}: {tmp_path} holds no checkpoint"):
        RemoeLM.create_from_arg_string(f"load={tmp_path}")


@pytest.mark.integration
def test_moved_tokenizer_names_the_callers_option(relu_checkpoint, tmp_path):
    from remoe_patches.eval.evaluation import ModelArgsError, RemoeLM

    with pytest.raises(ModelArgsError, match=r"pass tokenizer_dir=DIR in --model_args"):
        RemoeLM.create_from_arg_string(f"load={relu_checkpoint},tokenizer_dir={tmp_path}")
    export = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "export_checkpoint.py"),
            "--load",
            relu_checkpoint,
            "--output",
            str(tmp_path / "out"),
            "--tokenizer-dir",
            str(tmp_path),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env=clean_env(),
    )
    assert export.returncode == 2
    assert export.stderr.startswith("export_checkpoint.py: error: cannot rebuild")
    assert "pass --tokenizer-dir DIR holding them" in export.stderr


@pytest.mark.integration
def test_remoe_lm_eval_errors_are_one_line(relu_checkpoint, tmp_path):
    data = tmp_path / "data"
    write_fixtures(data)
    # piqa rows in another dataset's schema
    (data / "piqa" / "validation.jsonl").write_text(
        json.dumps({"question": "To open a jar,", "answer": "twist the lid."}) + "\n"
    )
    env = clean_env(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    for model_args, expected in (
        ("batch_size=16", "remoe-lm-eval: error: --model_args needs load=DIR"),
        (
            f"load={relu_checkpoint}",
            f"remoe-lm-eval: error: task piqa: the rows of {data / 'piqa' / 'validation.jsonl'}"
            " lack goal, sol1, sol2, label (they have question, answer): expected one JSON "
            'object per line with the schema {"goal": str, "sol1": str',
        ),
    ):
        result = lm_eval_cli(
            "--model",
            "remoe",
            "--model_args",
            model_args,
            "--tasks",
            "piqa",
            "--data_dir",
            str(data),
            env=env,
        )
        assert result.returncode == 2, result.stderr[-3000:]
        assert "Traceback" not in result.stderr, result.stderr[-3000:]
        assert result.stderr.splitlines()[-1].startswith(expected), result.stderr[-3000:]


def test_task_rows_without_the_tasks_fields_are_refused(tmp_path):
    from remoe_patches.eval.lm_eval_tasks import TaskDataError
    from remoe_patches.eval.lm_eval_tasks.functions import offline_dataset

    write_fixtures(tmp_path)
    (tmp_path / "hellaswag" / "train.jsonl").write_text(json.dumps({"ctx": "x"}) + "\n")
    with pytest.raises(TaskDataError, match=r"hellaswag/train\.jsonl lack activity_label, ctx_a"):
        offline_dataset("hellaswag", data_dir=str(tmp_path))
    (tmp_path / "piqa" / "validation.jsonl").write_text("goal,sol1,sol2,label\n")
    with pytest.raises(TaskDataError, match=r"task piqa: cannot read .*piqa/validation\.jsonl"):
        offline_dataset("piqa", data_dir=str(tmp_path))


# ---------------------------------------------------------------------------------------------
# Expert Choice and Lory: a row's routing must not depend on padding or on other rows


def _in_process_lm(router: str, batch_size: int):
    """A RemoeLM around a freshly built tiny ``router`` model (no checkpoint: only what
    ``_loglikelihood_tokens`` and ``greedy_generate`` read is set)."""
    from types import SimpleNamespace

    from remoe_patches.config.model_config import ModelConfig, ParallelConfig
    from remoe_patches.eval.evaluation import RemoeLM
    from remoe_patches.model.build import build_model
    from remoe_patches.config.router_registry import LoryOptions

    torch.manual_seed(3)
    config = ModelConfig(
        router=router,
        num_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        num_query_groups=2,
        ffn_hidden_size=64,
        vocab_size=128,
        seq_length=64,
        moe_aux_loss_coeff=0.0,
        init_method_std=0.2,
        **(dict(router_options=LoryOptions(segment_length=16)) if router == "lory" else {}),
    )
    model = build_model(config, ParallelConfig(), use_transformer_engine=False).model.eval()
    lm = RemoeLM.__new__(RemoeLM)
    super(RemoeLM, lm).__init__()  # lm-eval's LM: its cache hook
    lm.__dict__.update(
        model=model,
        model_backend="megatron",
        router=router,
        batch_size=batch_size,
        _max_length=64,
        _max_gen_toks=4,
        tokenizer=SimpleNamespace(
            eod=0,
            vocab_size=128,
            tokenize=lambda text: list(map(int, text.split())),
            detokenize=lambda tokens: " ".join(map(str, tokens)),
        ),
    )
    lm._device = next(model.parameters()).device
    return lm


@pytest.mark.parametrize("router", ["expert_choice", "lory"])
def test_padding_and_other_rows_do_not_change_a_rows_score(single_rank, router):
    """A 10-token row scored alone and in a batch with a 60-token row (so 50 padding tokens)
    gets the same log-likelihood, bit for bit, and the same greedy generation: under EC the
    padding would compete for the experts' places, under Lory it would enter the first
    segment's mean."""
    gen = torch.Generator().manual_seed(0)
    short = torch.randint(1, 128, (10,), generator=gen).tolist()
    long = torch.randint(1, 128, (60,), generator=gen).tolist()
    requests_ = [(None, short[:6], short[6:]), (None, long[:40], long[40:])]
    lm = _in_process_lm(router, batch_size=4)
    both = lm._loglikelihood_tokens(requests_, disable_tqdm=True)
    by_itself = lm._loglikelihood_tokens(requests_[:1], disable_tqdm=True)
    assert both[0] == by_itself[0]
    settings = {"until": [], "max_gen_toks": 3}
    texts = [" ".join(map(str, row)) for row in (short, long)]
    generated = lm.generate_until(
        requests("generate_until", [(text, settings) for text in texts]), disable_tqdm=True
    )
    alone_generated = lm.generate_until(
        requests("generate_until", [(texts[0], settings)]), disable_tqdm=True
    )
    assert generated[0] == alone_generated[0]
    # the same model with padding really routes the short row otherwise (what this guards)
    from remoe_patches.inference.trained_model import megatron_logits

    with torch.no_grad():
        unpadded = megatron_logits(lm.model, torch.tensor([short]))[0]
        padded = megatron_logits(lm.model, lm._padded([short, long]))[0, :10]
    assert not torch.allclose(unpadded, padded, atol=1e-4)
