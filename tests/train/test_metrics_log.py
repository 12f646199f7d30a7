"""MetricsLog: what each sink receives, read back the way a reader of the run would read it.

The console line is parsed with Megatron-LM-style regexes, ``metrics.jsonl`` with ``json``, the
tensorboard events with tensorboard's own reader; a disabled log (every rank but the last)
writes nothing anywhere.
"""

from __future__ import annotations

import io
import json
import math
import re

import pytest

from remoe_patches.train.metrics_log import MetricsLog, format_step_line
from remoe_patches.runs.run_directory import METRICS_FILE


def step_record(iteration=3, **changes):
    record = dict(
        iteration=iteration,
        train_iters=10,
        consumed_samples=12,
        ms_per_iteration=512.25,
        tokens_per_sec=1234.4,
        tflops_per_gpu=0.01234,
        lr=3.0e-4,
        global_batch_size=4,
        lm_loss=5.4321098,
        grad_norm=1.2345,
        skipped_iterations=1,
    )
    record.update(changes)
    return record


RELU = dict(
    reg_loss=0.123456789,
    l1_coeff=2.5e-3,
    sparsity=0.8125,
    sparsity_min=0.7,
    sparsity_max=0.95,
    sparsity_per_layer=[0.7, 0.95],
    dead_experts_per_layer=[[], [2, 3]],
)


def columns(line: str) -> dict:
    """``key: value`` columns of a Megatron-style line (``iteration`` as ``N/M``)."""
    assert line.endswith(" |")
    parts = [p.strip() for p in line[:-2].split(" | ")]
    first = re.fullmatch(r"iteration\s+(\d+)/\s*(\d+)", parts[0])
    assert first, parts[0]
    out = {"iteration": int(first.group(1)), "train_iters": int(first.group(2))}
    for part in parts[1:]:
        key, value = part.split(": ", 1)
        out[key] = value
    return out


def make_log(tmp_path, **kwargs):
    options = dict(
        metrics_dir=str(tmp_path / "run"),
        tensorboard_dir=None,
        total_iterations=10,
        start_iteration=0,
        enabled=True,
    )
    options.update(kwargs)
    return MetricsLog(**options)


def read_jsonl(path):
    return [json.loads(line) for line in open(path)]


def test_step_line_has_megatrons_columns_with_the_records_values():
    """Megatron-LM's iteration line (order, names, formats); every value reads back."""
    line = format_step_line(step_record())
    cols = columns(line)
    assert list(cols) == [
        "iteration",
        "train_iters",
        "consumed samples",
        "elapsed time per iteration (ms)",
        "tokens/s",
        "TFLOP/s per device",
        "learning rate",
        "global batch size",
        "lm loss",
        "grad norm",
        "number of skipped iterations",
    ]
    assert (cols["iteration"], cols["train_iters"]) == (3, 10)
    assert int(cols["consumed samples"]) == 12 and int(cols["global batch size"]) == 4
    assert float(cols["elapsed time per iteration (ms)"]) == pytest.approx(512.25, abs=0.05)
    assert float(cols["tokens/s"]) == pytest.approx(1234.4, abs=0.5)
    assert float(cols["TFLOP/s per device"]) == pytest.approx(0.01234, abs=0.005)
    assert float(cols["learning rate"]) == pytest.approx(3.0e-4, rel=1e-6)
    assert float(cols["lm loss"]) == pytest.approx(5.4321098, rel=1e-6)
    assert re.search(r"lm loss: \d\.\d{6}E[+-]\d\d ", line)  # Megatron-LM's %E
    assert float(cols["grad norm"]) == pytest.approx(1.2345, abs=5e-4)
    assert int(cols["number of skipped iterations"]) == 1
    # what scripts that parse Megatron-LM logs look for
    assert float(re.search(r"lm loss: ([\d.E+-]+)", line).group(1)) == pytest.approx(
        5.4321098, rel=1e-6
    )


def test_step_line_shows_relu_columns_and_load_balancing_only_when_present():
    """ReMoE's reg loss, coefficient and sparsity (with its layer range); TopK's balancing loss."""
    cols = columns(format_step_line(step_record(**RELU)))
    assert float(cols["reg loss"]) == pytest.approx(0.123456789, rel=1e-6)
    assert float(cols["l1 coeff"]) == pytest.approx(2.5e-3, rel=1e-4)
    sparsity = re.fullmatch(r"([\d.]+) \(min ([\d.]+), max ([\d.]+)\)", cols["sparsity"])
    assert [float(v) for v in sparsity.groups()] == [0.8125, 0.7, 0.95]
    assert "load balancing loss" not in cols
    topk = columns(format_step_line(step_record(load_balancing_loss=1.0625)))
    assert float(topk["load balancing loss"]) == pytest.approx(1.0625, rel=1e-6)
    assert not {"reg loss", "l1 coeff", "sparsity"} & set(topk)
    # the balancing loss sits before the grad norm, as in Megatron-LM
    names = list(topk)
    assert names.index("load balancing loss") == names.index("grad norm") - 1


def test_records_go_to_console_and_jsonl_in_order(tmp_path, capsys):
    """Each step and evaluation: one console line and one json line that parses back equal."""
    log = make_log(tmp_path, metrics_dir=str(tmp_path / "new" / "dir"))  # created on demand
    records = [step_record(1), step_record(2, **RELU), dict(iteration=2, val_lm_loss=4.5)]
    log.step(records[0])
    log.step(records[1])
    log.evaluation(records[2])
    log.print(" a note")
    log.close()
    assert read_jsonl(tmp_path / "new" / "dir" / METRICS_FILE) == records
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == [format_step_line(records[0]), format_step_line(records[1])]
    assert lines[2].startswith(" validation at iteration        2 |")
    assert lines[3] == " a note" and len(lines) == 4


@pytest.mark.parametrize("name, label", [("val_lm_loss", "validation"), ("test_lm_loss", "test")])
def test_evaluation_line_reports_loss_and_perplexity(tmp_path, capsys, name, label):
    """lm loss and PPL = exp(loss), Megatron-LM's evaluation line; PPL capped at exp(20)."""
    log = make_log(tmp_path)
    log.evaluation({"iteration": 7, name: 2.25})
    log.evaluation({"iteration": 8, name: 45.0})  # a diverged run must not overflow
    first, second = capsys.readouterr().out.splitlines()
    pattern = rf" {label} at iteration\s+(\d+) \| lm loss: ([\d.E+-]+) \| lm loss PPL: ([\d.E+-]+)"
    iteration, loss, ppl = re.fullmatch(pattern, first).groups()
    assert int(iteration) == 7 and float(loss) == pytest.approx(2.25, rel=1e-6)
    assert float(ppl) == pytest.approx(math.exp(2.25), rel=1e-6)
    iteration, loss, ppl = re.fullmatch(pattern, second).groups()
    assert float(loss) == pytest.approx(45.0, rel=1e-6)
    assert float(ppl) == pytest.approx(math.exp(20), rel=1e-6)
    assert read_jsonl(tmp_path / "run" / METRICS_FILE) == [
        {"iteration": 7, name: 2.25},
        {"iteration": 8, name: 45.0},
    ]


def test_the_loss_per_domain_follows_the_evaluation_line(tmp_path, capsys):
    log = make_log(tmp_path)
    record = {
        "iteration": 7,
        "val_lm_loss": 2.25,
        "val_lm_loss_per_domain": {"code": 2.0, "prose": 2.5},
    }
    log.evaluation(record)
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == "   lm loss per domain | code: 2.000000E+00 | prose: 2.500000E+00"
    assert read_jsonl(tmp_path / "run" / METRICS_FILE) == [record]


def test_resumed_run_appends_to_the_same_file(tmp_path):
    """A run resumed into the same directory keeps the earlier records."""
    first = make_log(tmp_path)
    first.step(step_record(1))
    first.close()
    second = make_log(tmp_path, start_iteration=1)
    second.step(step_record(2))
    second.close()
    assert [r["iteration"] for r in read_jsonl(tmp_path / "run" / METRICS_FILE)] == [1, 2]


def test_no_metrics_dir_still_prints(tmp_path, capsys):
    log = make_log(tmp_path, metrics_dir=None)
    log.step(step_record())
    assert capsys.readouterr().out == format_step_line(step_record()) + "\n"
    assert not (tmp_path / "run").exists()


def test_disabled_log_writes_nothing_anywhere(tmp_path, capsys):
    """Every rank but the logging one: no console, no file, no directory, no tensorboard."""
    log = make_log(tmp_path, tensorboard_dir=str(tmp_path / "tb"), enabled=False)
    log.step(step_record(**RELU))
    log.evaluation(dict(iteration=3, val_lm_loss=4.0))
    log.print("hello")
    log.advance()
    log.close()
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    assert list(tmp_path.iterdir()) == []


def test_tensorboard_gets_finite_scalars_and_per_layer_lists(tmp_path):
    """Numbers as scalars at their iteration; lists as ``key/layer_N`` from 1, mappings as
    ``key/name``; NaN and nested lists skipped; ``iteration`` is the step, not a scalar."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = tmp_path / "tb"
    log = make_log(tmp_path, tensorboard_dir=str(tb), per_layer=True)  # --moe-per-layer-logging
    log.step(step_record(5, **RELU, load_balancing_loss=float("nan")))
    log.step(step_record(6, lm_loss=4.0, sparsity_per_layer=[0.5, float("inf"), 0.25]))
    log.evaluation(
        dict(
            iteration=6,
            val_lm_loss=4.5,
            val_lm_loss_per_domain={"code": 4.25, "prose": float("nan")},
        )
    )
    log.close()
    events = EventAccumulator(str(tb))
    events.Reload()
    tags = set(events.Tags()["scalars"])

    def scalars(tag):
        return [(e.step, pytest.approx(e.value, rel=1e-6)) for e in events.Scalars(tag)]

    assert scalars("lm_loss") == [(5, 5.4321098), (6, 4.0)]
    assert scalars("val_lm_loss") == [(6, 4.5)]
    assert scalars("sparsity_per_layer/layer_1") == [(5, 0.7), (6, 0.5)]
    assert scalars("sparsity_per_layer/layer_2") == [(5, 0.95)]  # inf skipped
    assert scalars("sparsity_per_layer/layer_3") == [(6, 0.25)]
    assert scalars("val_lm_loss_per_domain/code") == [(6, 4.25)]  # a mapping: key/name
    assert "val_lm_loss_per_domain/prose" not in tags
    assert scalars("skipped_iterations") == [(5, 1), (6, 1)]
    assert "iteration" not in tags and "load_balancing_loss" not in tags
    assert not any(tag.startswith("dead_experts_per_layer") for tag in tags)
    # Megatron-LM's tags beside ours, in its units; "vs samples" at the consumed samples (12)
    assert scalars("lm loss") == [(5, 5.4321098), (6, 4.0)]
    assert scalars("lm loss vs samples") == [(12, 5.4321098), (12, 4.0)]
    assert scalars("learning-rate") == [(5, 3.0e-4), (6, 3.0e-4)]
    assert scalars("grad-norm")[0] == (5, 1.2345) and scalars("batch-size")[0] == (5, 4)
    assert scalars("iteration-time")[0] == (5, 0.51225)  # seconds
    assert scalars("lm loss validation") == [(6, 4.5)]
    assert scalars("lm loss validation ppl") == [(6, math.exp(4.5))]


def tensorboard_tags(tmp_path, record, **options) -> dict:
    """The scalars a log with ``options`` writes of ``record``: {tag: value}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = tmp_path / "tb"
    log = make_log(tmp_path, tensorboard_dir=str(tb), **options)
    log.step(record)
    log.close()
    events = EventAccumulator(str(tb))
    events.Reload()
    return {tag: events.Scalars(tag)[0].value for tag in events.Tags()["scalars"]}


ROUTING = dict(
    moe_layers=[2, 4],
    expert_share_cv=0.25,
    expert_share_per_layer=[[0.75, 0.25], [0.5, 0.5]],
    expert_share_cv_per_layer=[0.5, 0.0],
    timers_ms={"forward-backward": 12.5},
    memory_rss_gb=1.5,
    memory_rss_peak_gb=2.0,
    memory_allocated_gb=0.5,
)


def test_per_layer_timers_and_memory_reach_tensorboard_only_when_asked(tmp_path):
    """metrics.jsonl holds everything; tensorboard the per-layer values with
    --moe-per-layer-logging (under the MoE layers' numbers), the timers with
    --log-timers-to-tensorboard and the memory with --log-memory-to-tensorboard, those two
    under Megatron-LM's tags."""
    record = step_record(5, **ROUTING)
    plain = tensorboard_tags(tmp_path / "plain", record)
    assert plain["expert_share_cv"] == 0.25
    assert not any("layer" in tag or "mem" in tag for tag in plain)
    assert [tag for tag in plain if tag.endswith("-time")] == ["iteration-time"]
    assert read_jsonl(tmp_path / "plain" / "run" / METRICS_FILE) == [record]
    every = tensorboard_tags(tmp_path / "every", record, per_layer=True, timers=True, memory=True)
    assert every["expert_share_cv_per_layer/layer_2"] == 0.5
    assert every["expert_share_cv_per_layer/layer_4"] == 0.0
    assert every["expert_share_per_layer/layer_2/expert_0"] == 0.75
    assert every["expert_share_per_layer/layer_4/expert_1"] == 0.5
    assert every["forward-backward-time"] == 12.5 and "timers_ms/forward-backward" not in every
    assert every["memory_rss_peak_gb"] == 2.0
    assert every["mem-allocated-bytes"] == 0.5 * 1024**3
    assert format_step_line(record).endswith(" | peak memory (GB): 2.00 |")
    assert "expert load CV: 0.250" in format_step_line(record)


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_on_a_terminal_counts_from_the_start_iteration(tmp_path, capsys, monkeypatch):
    """On an interactive terminal a bar runs from ``start_iteration`` to ``total_iterations``;
    lines are printed above it, not lost."""
    terminal = FakeTerminal()
    monkeypatch.setattr("sys.stderr", terminal)
    log = make_log(tmp_path, total_iterations=20, start_iteration=5)
    assert log.progress is not None
    assert (log.progress.n, log.progress.total) == (5, 20)
    log.advance()
    log.advance(3)
    assert log.progress.n == 9
    log.step(step_record(9))
    log.close()
    assert capsys.readouterr().out.splitlines() == [format_step_line(step_record(9))]
    assert "9/20" in terminal.getvalue()


def test_no_progress_bar_without_a_terminal(tmp_path, monkeypatch):
    monkeypatch.setattr("sys.stderr", io.StringIO())  # a pipe or a file, e.g. under torchrun
    log = make_log(tmp_path)
    assert log.progress is None
    log.advance()  # nothing to advance
    log.close()
