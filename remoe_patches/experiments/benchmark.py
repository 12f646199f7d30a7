"""Training throughput of dense vs TopK MoE vs ReMoE models of one preset, in one process.

The three models have the same active parameters per token: the dense FFN is ``k * G`` expert
widths wide. Each is built and trained by the code ``pretrain_gpt.py`` runs (its ``RunConfig``,
``run_config``, is the one ``pretrain_gpt.py`` makes of the same settings; then
``training.build_training_objects`` and ``training_step.train_step``) on synthetic
Zipf-distributed tokens that are already on the device, so that only the step is timed.

Phases measured (``steps`` timed steps each, after ``warmup_steps`` untimed ones):

- dense and TopK MoE: once, after the warm-up;
- ReMoE ``stage I``: ``stage1_steps`` steps right after the warm-up, while routing is still
  dense (most experts active); it then trains on until the sparsity has held the target
  ``1 - k/E`` for ``settle_window`` steps (at most ``max_settle_steps``), and ``stage III`` is
  measured.

The final phases (dense, TopK, ReMoE stage III) are timed in alternating rounds while all models
stay in memory (``interleave``), so that drift of the machine falls on all alike; without it,
or when the models' weights and optimizer states would take more than half of the GPU's free
memory, each model is measured and freed in turn.

For every phase: ms per step (median, 25th-75th percentile), tokens/s, model TFLOP/s and MFU
(FLOPs from the experts the routers actually activated, ``flops.training_flops_per_token``; MFU
against the device's bf16 peak, none on CPU); memory: what the model holds between steps
(weights, gradients, optimizer state) plus the peak of one step above it (CUDA: allocated
bytes; CPU: resident set, sampled every millisecond), and that step peak alone; the routers'
share of the step time, measured inside the same timed steps (each router's forward, and its
backward from its output's gradient to its input's, on the step's own clock: CUDA events on a
GPU), so it is a part of the step it is a share of; host synchronisations per step: all of
them, and those made by the routers, the regularizer and the coefficient update (which must be
zero). A step-time ratio whose spread exceeds ``MEANINGFUL_SPREAD`` (a busy machine) is reported
as not meaningful instead of with a verdict.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
import statistics
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch

from megatron.core.transformer.moe.router import Router
from megatron.core.transformer.transformer_config import TransformerConfig

from remoe_patches.config.model_config import (
    PRESETS,
    ConfigError,
    ModelConfig,
    ParallelConfig,
    default_router_dtype,
)
from remoe_patches.train.flops import training_flops_per_token
from remoe_patches.runtime.host_sync import OUTSIDE_SCOPES, SOURCES, sync_counter
from remoe_patches.runtime.parallel import local_device, seed_all
from remoe_patches.config.router_registry import ROUTERS as ROUTER_KINDS
from remoe_patches.config.run_config import DataConfig, LayerOptions, RunConfig, TrainingConfig
from remoe_patches.train.training import build_training_objects
from remoe_patches.train.training_step import StepRecord, train_step

# Dense bf16 tensor-core peaks in TFLOP/s, matched against torch.cuda.get_device_name().
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
ROUTERS = tuple(ROUTER_KINDS)
DEFAULT_ROUTERS = ("dense", "topk", "relu")
# A ratio of two step times is compared with 1 only while its spread (the two relative half
# IQRs in quadrature) is at most this; beyond, the machine's noise decides the verdict.
MEANINGFUL_SPREAD = 0.25
REMOE_SCOPE = "router+regularizer+update"


@dataclass
class BenchmarkConfig:
    """What to benchmark. Model sizes come from ``model_config.PRESETS`` plus
    ``model_overrides``."""

    preset: str = "tiny"
    """``tiny`` (CPU), ``182m``, ``469m`` or ``978m``."""
    model_overrides: dict = field(default_factory=dict)
    """Preset fields to change (num_layers, hidden_size, num_attention_heads, num_query_groups,
    seq_length, vocab_size, ffn_hidden_size)."""
    num_experts: int = 8
    """E."""
    topk: int = 1
    """k (TopK's active experts; ReMoE's target sparsity 1 - k/E)."""
    granularity: int = 1
    """G."""
    routers: tuple = DEFAULT_ROUTERS
    """Which routers to run: dense, topk, relu, or the Table 2 baselines hash, expert_choice,
    sparsemixer, lory."""
    micro_batch_size: int = 8
    """Sequences per micro-batch."""
    num_microbatches: int = 1
    """Micro-batches per step (gradient accumulation)."""
    warmup_steps: int = 5
    """Untimed steps before the first measurement."""
    steps: int = 20
    """Timed steps per phase."""
    stage1_steps: int = 10
    """Timed steps of ReMoE's stage I (short: routing is dense only for the first steps)."""
    settle_window: int = 20
    """ReMoE's stage III starts once the last this many steps held the target (see ``settle``)."""
    settle_tolerance: float = 0.01
    """How close to the target the window's mean sparsity must be (each step: 5 times this)."""
    max_settle_steps: int = 400
    """Give up settling after this many steps (the phase is then reported as not settled)."""
    interleave: bool = True
    """Keep all models in memory and time their final phases in alternating rounds."""
    rounds: int = 5
    """Alternating rounds when interleaving (the timed steps are split over them)."""
    recompute: str = "none"
    """Activation recomputation: ``none``, ``moe`` (the MoE layers) or ``full``."""
    grouped_gemm: bool = True
    """Grouped GEMM experts (``grouped_mm``, which takes the sorted path's offsets on the device;
    on CPU a loop over the experts); off: megatron's SequentialMLP, which reads counts on the
    host."""
    token_dispatcher: str = "alltoall"
    """The MoE models' token path: megatron's ``alltoall`` (the launchers' ``configs/*.yaml``, so
    the figures describe a paper run), ``allgather``, or ``sorted`` (one process needs no
    communication: device-side offsets, one host read per layer)."""
    bf16: Optional[bool] = None
    """bf16 mixed precision; default: on GPUs."""
    lr: float = 5e-4
    seed: int = 1234
    peak_tflops: Optional[float] = None
    """The device's peak for MFU; default: from ``PEAK_BF16_TFLOPS`` by device name."""

    def validate(self) -> "BenchmarkConfig":
        def fail(field_name, message):
            raise ConfigError(f"BenchmarkConfig.{field_name}: {message}")

        if self.preset not in PRESETS:
            fail("preset", f"{self.preset!r} is not one of {', '.join(PRESETS)}")
        unknown = set(self.model_overrides) - {
            "num_layers",
            "hidden_size",
            "num_attention_heads",
            "num_query_groups",
            "seq_length",
            "vocab_size",
            "ffn_hidden_size",
        }
        if unknown:
            fail("model_overrides", f"unknown fields {sorted(unknown)}")
        bad_routers = [r for r in self.routers if r not in ROUTERS]
        if bad_routers or not self.routers:
            fail("routers", f"{bad_routers or 'none'}: choose from {', '.join(ROUTERS)}")
        if self.recompute not in ("none", "moe", "full"):
            fail("recompute", f"{self.recompute!r} is not one of none, moe, full")
        if self.token_dispatcher not in ("sorted", "alltoall", "allgather"):
            fail(
                "token_dispatcher",
                f"{self.token_dispatcher!r} is not one of sorted, alltoall, allgather",
            )
        for name in (
            "micro_batch_size",
            "num_microbatches",
            "steps",
            "stage1_steps",
            "settle_window",
            "rounds",
        ):
            if getattr(self, name) < 1:
                fail(name, "must be >= 1")
        if self.interleave and self.rounds > self.steps:
            fail("rounds", f"{self.rounds} rounds need at least as many steps (steps={self.steps})")
        if self.warmup_steps < 1:
            fail("warmup_steps", "must be >= 1 (the first step allocates the optimizer state)")
        return self

    @property
    def model_fields(self) -> dict:
        return {
            "num_query_groups": 4,
            "vocab_size": 51200,
            "seq_length": 1024,
            **PRESETS[self.preset],
            **self.model_overrides,
        }


@dataclass
class PhaseResult:
    """One measured phase of one model; times in ms, memory in bytes."""

    router: str
    phase: str
    step_ms: list
    median_ms: float
    p25_ms: float
    p75_ms: float
    tokens_per_s: float
    active_experts_per_token: float
    sparsity: Optional[float]
    model_tflops: float
    mfu: Optional[float]
    peak_memory: int
    step_memory: int
    router_ms_per_step: Optional[float]
    router_share: Optional[float]
    syncs_per_step: float
    remoe_syncs_per_step: float
    settled_after_steps: Optional[int] = None
    syncs_by_source: dict = field(default_factory=dict)
    """Host syncs per step by the part of the step that made them (``host_sync.SOURCES``)."""
    router_step_ms: Optional[list] = None
    """The routers' milliseconds in each timed step (``router_share``: the median of their
    shares of ``step_ms``)."""

    @property
    def label(self) -> str:
        return ROUTER_KINDS[self.router].title + (f" ({self.phase})" if self.phase else "")

    @property
    def relative_spread(self) -> float:
        """Half the interquartile range over the median."""
        return (self.p75_ms - self.p25_ms) / 2.0 / self.median_ms


# ---------------------------------------------------------------------------------------------
# The models' run configs

# megatron's TopKRouter options the benchmark sets for every MoE model that honours them
# (``RouterKind.topk_router_flags``; configs/*_moe.yaml's dMoE baseline: softmax before the top-k),
# the others at megatron-core's defaults.
_TOPK_ROUTER_SETTINGS = dict(moe_router_pre_softmax=True)
# pretrain_gpt.py's --rotary-base default (Megatron-LM's), which the benchmark has always used
_ROTARY_BASE = 10_000


def run_config(config: BenchmarkConfig, router: str, device: torch.device) -> RunConfig:
    """``router``'s RunConfig under ``config``: the run ``pretrain_gpt.py`` would make of the same
    settings (mock data: the batches are ``zipf_batches``), with the preset's vocabulary."""
    kind = ROUTER_KINDS[router]
    m = config.model_fields
    ffn = m.get("ffn_hidden_size") or 4 * m["hidden_size"]
    model = dict(
        num_layers=m["num_layers"],
        hidden_size=m["hidden_size"],
        num_attention_heads=m["num_attention_heads"],
        num_query_groups=m["num_query_groups"],
        vocab_size=m["vocab_size"],
        seq_length=m["seq_length"],
        rotary_base=_ROTARY_BASE,
        init_method_std=0.01,
        router=router,
    )
    layers = {}
    if not kind.is_moe:
        # the same active parameters per token as k of the E*G experts of width ffn/G
        model.update(ffn_hidden_size=config.topk * ffn)
    else:
        experts = config.num_experts * config.granularity
        model.update(
            ffn_hidden_size=ffn,
            num_experts=config.num_experts,
            topk=config.topk,
            granularity=config.granularity,
            moe_aux_loss_coeff=0.01,
            # Lory: the paper's 256-token segments, or fewer that divide a short sequence
            router_options=kind.default_options(m["seq_length"]),
            token_dispatcher=config.token_dispatcher,
            moe_grouped_gemm=config.grouped_gemm,
            moe_router_dtype=default_router_dtype(experts),
        )
        layers.update(topk_router=_topk_router_options(config, kind))
    if config.recompute == "moe" and kind.is_moe:
        layers.update(recompute_granularity="selective", recompute_modules=("moe",))
    elif config.recompute == "full":
        layers.update(
            recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1
        )
    on_gpu = device.type == "cuda"
    training = TrainingConfig(
        micro_batch_size=config.micro_batch_size,
        global_batch_size=config.micro_batch_size * config.num_microbatches,
        # a long, flat schedule: the benchmark's steps all run near lr
        train_iters=1_000_000,
        lr=config.lr,
        min_lr=config.lr / 10,
        lr_warmup_iters=1,
        lr_decay_style="cosine",
        clip_grad=1.0,
        seed=config.seed,
        bf16=config.bf16 if config.bf16 is not None else on_gpu,
    )
    return RunConfig(
        model=ModelConfig(**model),
        parallel=ParallelConfig(),
        training=training,
        layers=LayerOptions(**layers),
        data=DataConfig(mock_data=True),
    ).validate()


def _topk_router_options(config: BenchmarkConfig, kind) -> dict:
    """``LayerOptions.topk_router`` of ``kind``'s model: the TopKRouter options it honours."""
    settings = dict(_TOPK_ROUTER_SETTINGS)
    if kind.megatron_topk_router:  # the dMoE baseline of configs/*_moe.yaml: gates scaled by E/k
        settings.update(moe_router_topk_scaling_factor=config.num_experts / config.topk)
    defaults = {f.name: f.default for f in dataclasses.fields(TransformerConfig)}
    return {name: settings.get(name, defaults[name]) for name in kind.layer_topk_router_options}


def zipf_batches(
    vocab_size: int,
    seq_length: int,
    micro_batch_size: int,
    count: int,
    device: torch.device,
    seed: int,
) -> list[dict]:
    """``count`` micro-batches of tokens drawn with Zipf-like frequencies (p ~ 1/(rank + 10)),
    so routing sees frequent and rare tokens as in text; placed on ``device`` up front."""
    gen = torch.Generator().manual_seed(seed)
    probabilities = 1.0 / (torch.arange(vocab_size, dtype=torch.float64) + 10.0)
    permutation = torch.randperm(vocab_size, generator=gen)
    batches = []
    for _ in range(count):
        ranks = torch.multinomial(
            probabilities, micro_batch_size * (seq_length + 1), replacement=True, generator=gen
        )
        tokens = permutation[ranks].view(micro_batch_size, seq_length + 1)
        batches.append(
            {
                "tokens_BS": tokens[:, :-1].contiguous().to(device),
                "labels_BS": tokens[:, 1:].contiguous().to(device),
                "loss_mask_BS": torch.ones(micro_batch_size, seq_length, device=device),
                "position_ids_BS": torch.arange(seq_length, device=device)
                .expand(micro_batch_size, -1)
                .contiguous(),
            }
        )
    return batches


def _cycle(items):
    while True:
        yield from items


# ---------------------------------------------------------------------------------------------
# Measuring


class _Session:
    """One model being benchmarked: its training objects, batches and instrumentation."""

    def __init__(self, config: BenchmarkConfig, router: str, device: torch.device):
        self.config, self.router, self.device = config, router, device
        self._memory_before_build = self._held_memory()
        self.run_config = run_config(config, router, device)
        seed_all(config.seed)  # every model starts from the same weights, whatever ran before
        self.objects = build_training_objects(self.run_config, device=device)
        self.model_config = self.run_config.model
        vocab, seq_length = self.model_config.vocab_size, self.model_config.seq_length
        self.batches = _cycle(
            zipf_batches(
                vocab,
                seq_length,
                config.micro_batch_size,
                count=max(8, config.num_microbatches),
                device=device,
                seed=config.seed,
            )
        )
        self.routers = [
            m
            for chunk in self.objects.model_chunks
            for m in chunk.modules()
            if isinstance(m, Router)
        ]
        self.syncs = None
        self.clock = None  # a _RouterClock while timed steps run
        self._router_calls: dict = {}
        self.resident_memory = 0  # known after the warm-up has created the optimizer state
        self._router_hooks = []
        self._hook_routers()

    def _hook_routers(self) -> None:
        for router_module in self.routers:
            self._router_hooks += [
                router_module.register_forward_pre_hook(self._enter_router),
                router_module.register_forward_hook(self._leave_router),
            ]

    def _unhook_routers(self) -> None:
        for handle in self._router_hooks:
            handle.remove()
        self._router_hooks = []

    # Router hooks: count each router's syncs under REMOE_SCOPE; while timing, clock its forward
    # (pre-hook to hook) and its backward (its output's gradient to its input's: the input goes
    # through a view that only the router uses, so its gradient is the router's alone).
    def _enter_router(self, module, args):
        if self.syncs is not None:
            self._scope = self.syncs.scope(REMOE_SCOPE)
            self._scope.__enter__()
        if self.clock is None:
            return None
        clock, call = self.clock, {"forward": self.clock.mark()}
        self._router_calls[module] = call
        routed = args[0].view_as(args[0])
        if not routed.requires_grad:  # no backward (e.g. the no-grad pass of recomputation)
            return None

        def input_gradient(grad):
            if "backward" in call:
                clock.add(call.pop("backward"), clock.mark())

        routed.register_hook(input_gradient)
        return (routed, *args[1:])

    def _leave_router(self, module, args, output):
        if self.clock is not None and module in self._router_calls:
            clock, call = self.clock, self._router_calls.pop(module)
            clock.add(call["forward"], clock.mark())
            probs = output[0] if isinstance(output, tuple) else output
            if probs.requires_grad:
                probs.register_hook(lambda grad: call.__setitem__("backward", clock.mark()))
        if self.syncs is not None:
            self._scope.__exit__(None, None, None)

    def step(self) -> StepRecord:
        o, training = self.objects, self.run_config.training
        batches = [next(self.batches) for _ in range(self.config.num_microbatches)]
        return train_step(
            o.model_chunks,
            o.optimizer,
            o.scheduler,
            o.regularizer,
            batches,
            seq_length=self.model_config.seq_length,
            micro_batch_size=training.micro_batch_size,
            global_batch_size=training.global_batch_size,
            regularizer_scope=self._regularizer_scope,
        )

    def _regularizer_scope(self):
        # train_step's seam: the regularizer's step-end work (its reduction, the coefficient
        # update) counts as ReMoE's syncs while timing.
        if self.syncs is None:
            return contextlib.nullcontext()
        return self.syncs.scope(REMOE_SCOPE)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def timed_steps(self, count: int, timing: "Timing") -> None:
        """Run ``count`` steps, adding their times (the routers' part too), records and host
        syncs to ``timing``."""
        self.syncs = sync_counter(self.device)
        self.clock = _RouterClock(self.device)
        with self.syncs:
            for _ in range(count):
                self.synchronize()
                started = time.perf_counter()
                timing.records.append(self.step())
                self.synchronize()
                timing.step_ms.append(1000.0 * (time.perf_counter() - started))
                timing.router_ms.append(self.clock.end_step())
        self.clock = None
        timing.syncs += self.syncs.total
        timing.remoe_syncs += self.syncs.by_scope[REMOE_SCOPE]
        timing.syncs_by_source.update(self.syncs.by_source)
        self.syncs = None

    def warm_up(self) -> None:
        """The untimed first steps; afterwards ``resident_memory`` is what the model holds
        between steps (weights, gradients, optimizer state), in bytes."""
        for _ in range(self.config.warmup_steps):
            self.step()
        self.resident_memory = max(0, self._held_memory() - self._memory_before_build)

    def _held_memory(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.memory_allocated()
        import psutil

        _release_free_heap()
        return psutil.Process().memory_info().rss

    def step_memory(self) -> int:
        """Peak memory of one step above what was held before it, in bytes (CUDA: allocated;
        CPU: resident set, sampled every millisecond)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            held = torch.cuda.memory_allocated()
            self.step()
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - held
        sampler = _ResidentSetSampler()
        with sampler:
            self.step()
        return sampler.peak - sampler.start

    def close(self) -> None:
        self.objects = self.routers = self.batches = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


class _RouterClock:
    """The routers' time inside each timed step, on the step's own timeline (CUDA events on a
    GPU, recorded in the stream without waiting; ``perf_counter`` on CPU). The intervals of one
    step follow each other (layer after layer, forward then backward), so their sum is a part of
    the step's time."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.intervals: list = []

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def add(self, start, end) -> None:
        self.intervals.append((start, end))

    def end_step(self) -> float:
        """The routers' milliseconds in the step just synchronized; starts the next step."""
        if self.cuda:
            ms = sum(start.elapsed_time(end) for start, end in self.intervals)
        else:
            ms = 1000.0 * sum(end - start for start, end in self.intervals)
        self.intervals = []
        return ms


class _ResidentSetSampler:
    """The process's peak resident set size while inside, sampled every millisecond."""

    def __enter__(self):
        import psutil

        self._process = psutil.Process()
        _release_free_heap()
        self.start = self.peak = self._process.memory_info().rss
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._done.wait(0.001):
            self.peak = max(self.peak, self._process.memory_info().rss)

    def __exit__(self, *exc):
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)
        return False


def _release_free_heap() -> None:
    """Give freed heap memory back to the OS (glibc), so the baseline is what is held."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _percentile(values: list, q: float) -> float:
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass
class Timing:
    """What the timed steps of one phase gathered."""

    step_ms: list = field(default_factory=list)
    router_ms: list = field(default_factory=list)  # the routers' part of each step
    records: list = field(default_factory=list)
    syncs: int = 0
    remoe_syncs: int = 0
    syncs_by_source: Counter = field(default_factory=Counter)


def finish_phase(
    session: _Session,
    phase: str,
    timing: Timing,
    peak_tflops: Optional[float],
    settled_after: Optional[int] = None,
) -> PhaseResult:
    """Turn a phase's timed steps into its row; times the routers and one step's memory."""
    config, model_config = session.config, session.model_config
    times, steps = timing.step_ms, len(timing.step_ms)
    sparsity = None
    if model_config.kind.adaptive_l1:
        sparsity = statistics.fmean(float(r.routing.sparsity) for r in timing.records)
        active = (1.0 - sparsity) * model_config.total_experts
    else:
        active = model_config.nominal_active_experts
    median = statistics.median(times)
    tokens_per_step = config.micro_batch_size * config.num_microbatches * model_config.seq_length
    flops_per_step = training_flops_per_token(model_config, active) * tokens_per_step
    tflops = flops_per_step / (median / 1000.0) / 1e12
    router_ms = router_share = None
    if session.routers:  # the routers' part of the same steps (median of the per-step shares)
        router_ms = statistics.median(timing.router_ms)
        router_share = statistics.median(r / t for r, t in zip(timing.router_ms, times))
    step_memory = session.step_memory()
    return PhaseResult(
        router=session.router,
        phase=phase,
        step_ms=times,
        median_ms=median,
        p25_ms=_percentile(times, 0.25),
        p75_ms=_percentile(times, 0.75),
        tokens_per_s=tokens_per_step / (median / 1000.0),
        active_experts_per_token=active,
        sparsity=sparsity,
        model_tflops=tflops,
        mfu=None if peak_tflops is None else tflops / peak_tflops,
        peak_memory=session.resident_memory + step_memory,
        step_memory=step_memory,
        router_ms_per_step=router_ms,
        router_share=router_share,
        router_step_ms=timing.router_ms if session.routers else None,
        syncs_per_step=timing.syncs / steps,
        remoe_syncs_per_step=timing.remoe_syncs / steps,
        settled_after_steps=settled_after,
        syncs_by_source={
            source: count / steps for source, count in sorted(timing.syncs_by_source.items())
        },
    )


def measure_phase(
    session: _Session,
    phase: str,
    peak_tflops: Optional[float],
    settled_after: Optional[int] = None,
    steps: Optional[int] = None,
) -> PhaseResult:
    """``steps`` (default ``config.steps``) timed steps of one session in one block."""
    timing = Timing()
    session.timed_steps(steps or session.config.steps, timing)
    return finish_phase(session, phase, timing, peak_tflops, settled_after)


def settle(session: _Session) -> tuple[bool, int]:
    """Train until the sparsity holds the target: over the last ``settle_window`` steps its mean
    is within ``settle_tolerance`` of ``1 - k/E`` and every step within five times that (a
    sparsity still climbing through the target, or overshooting, does not count)."""
    config = session.config
    target = session.model_config.target_sparsity
    window = []
    for step in range(1, config.max_settle_steps + 1):
        window = (window + [float(session.step().routing.sparsity)])[-config.settle_window :]
        if (
            len(window) == config.settle_window
            and abs(statistics.fmean(window) - target) <= config.settle_tolerance
            and max(abs(s - target) for s in window) <= 5 * config.settle_tolerance
        ):
            return True, step
    return False, config.max_settle_steps


def device_peak_tflops(device: torch.device, override: Optional[float]) -> Optional[float]:
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_BF16_TFLOPS.items():
        if key in name:
            return peak
    return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({torch.get_num_threads()} threads)"


def run_benchmark(
    config: BenchmarkConfig, device: Optional[torch.device] = None, progress=print
) -> dict:
    """Benchmark each router of ``config``; megatron's parallel groups must be initialized
    (one rank). Returns ``{"device", "peak_tflops", "config", "results", "ratios"}``.

    With ``config.interleave`` all models stay in memory and their final phases are timed in
    ``config.rounds`` alternating blocks, so that a machine's drift (other load, clocks) falls
    on all of them alike; otherwise each model is measured, then freed, in turn.
    """
    config.validate()
    if device is None:
        device = local_device()
    peak_tflops = device_peak_tflops(device, config.peak_tflops)
    results = []

    def prepare(router) -> tuple:
        """Build and warm up; for ReMoE measure stage I and settle. -> (session, phase, steps)"""
        progress(
            f" benchmark: {ROUTER_KINDS[router].title}: building, "
            f"{config.warmup_steps} warm-up steps"
        )
        session = _Session(config, router, device)
        session.warm_up()
        if not ROUTER_KINDS[router].adaptive_l1:  # ReMoE: stage I, then the settled stage
            return session, "", None
        progress(
            f" benchmark: {ROUTER_KINDS[router].title}: stage I, {config.stage1_steps} timed steps"
        )
        results.append(measure_phase(session, "stage I", peak_tflops, steps=config.stage1_steps))
        progress(
            f" benchmark: {ROUTER_KINDS[router].title}: settling "
            f"(at most {config.max_settle_steps} steps)"
        )
        settled, steps = settle(session)
        return session, "stage III" if settled else "not settled", steps

    interleave = config.interleave and _fit_together(config, device, progress)
    if interleave:
        prepared = [prepare(router) for router in config.routers]
        timings = [Timing() for _ in prepared]
        titles = ", ".join(ROUTER_KINDS[r].title for r in config.routers)
        progress(
            f" benchmark: timing {titles} in "
            f"{config.rounds} alternating rounds of {config.steps} steps in all"
        )
        for round_index in range(config.rounds):
            block = _block_size(config.steps, config.rounds, round_index)
            for (session, _, _), timing in zip(prepared, timings):
                session.timed_steps(block, timing)
        for (session, phase, settled_after), timing in zip(prepared, timings):
            results.append(finish_phase(session, phase, timing, peak_tflops, settled_after))
            session.close()
    else:
        for router in config.routers:
            session, phase, settled_after = prepare(router)
            try:
                progress(f" benchmark: {ROUTER_KINDS[router].title}: {config.steps} timed steps")
                results.append(measure_phase(session, phase, peak_tflops, settled_after))
            finally:
                session.close()
    order = {router: index for index, router in enumerate(config.routers)}
    results.sort(key=lambda r: (order[r.router], r.phase != "stage I"))
    return {
        "device": device_name(device),
        "peak_tflops": peak_tflops,
        "config": asdict(config),
        "results": results,
        "ratios": step_time_ratios(results),
    }


def _fit_together(config: BenchmarkConfig, device: torch.device, progress) -> bool:
    """Whether all models' weights, gradients and optimizer states take at most half of the
    GPU's free memory (the rest for activations); always on CPU."""
    if device.type != "cuda":
        return True
    bf16 = config.bf16 if config.bf16 is not None else True
    # bf16 weights + fp32 gradients + fp32 master weights + two Adam moments; or fp32 all along
    bytes_per_parameter = 18 if bf16 else 16
    needed = sum(
        run_config(config, router, device).model.num_parameters() * bytes_per_parameter
        for router in config.routers
    )
    free, _ = torch.cuda.mem_get_info(device)
    if needed <= free / 2:
        return True
    progress(
        f" benchmark: the models need ~{needed / 2**30:.0f} GiB for weights and optimizer "
        f"state together ({free / 2**30:.0f} GiB free): measuring one after another"
    )
    return False


def _block_size(total: int, rounds: int, index: int) -> int:
    """Split ``total`` steps over ``rounds`` blocks as evenly as possible."""
    return total // rounds + (1 if index < total % rounds else 0)


def step_time_ratios(results: list) -> dict:
    """ReMoE/TopK (per ReMoE phase) and MoE/dense median step-time ratios with their spread
    (the two phases' relative half-IQRs added in quadrature). ``meaningful``: the spread is at
    most ``MEANINGFUL_SPREAD``; otherwise ``at_most_1`` is None (no verdict)."""
    by_label = {r.label: r for r in results}
    ratios = {}

    def ratio(name, numerator, denominator):
        spread = math.hypot(numerator.relative_spread, denominator.relative_spread)
        value = numerator.median_ms / denominator.median_ms
        meaningful = spread <= MEANINGFUL_SPREAD
        ratios[name] = {
            "ratio": value,
            "spread": spread,
            "meaningful": meaningful,
            "at_most_1": value <= 1.0 + spread if meaningful else None,
        }

    # ReMoE's phases against megatron's TopK router, every MoE against the dense model
    topk = by_label.get(_title_of(lambda kind: kind.megatron_topk_router))
    dense = by_label.get(_title_of(lambda kind: not kind.is_moe))
    for result in results:
        if ROUTER_KINDS[result.router].adaptive_l1 and topk is not None:
            ratio(f"{result.label} / {topk.label}", result, topk)
    for result in results:
        if ROUTER_KINDS[result.router].is_moe and dense is not None:
            ratio(f"{result.label} / {dense.label}", result, dense)
    return ratios


def _title_of(has_property) -> str:
    """The title of the router kind with ``has_property`` (there is one)."""
    (kind,) = [kind for kind in ROUTER_KINDS.values() if has_property(kind)]
    return kind.title


# ---------------------------------------------------------------------------------------------
# Reporting


def _memory(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def format_table(report: dict) -> str:
    """The markdown table and the ratio lines."""
    cuda = not report["device"].startswith("CPU")
    memory_kind = "allocated" if cuda else "RSS"
    header = [
        "model",
        "active experts/token",
        "ms/step median",
        "p25-p75",
        "tokens/s",
        "model TFLOP/s",
        "MFU",
        f"peak memory ({memory_kind})",
        "step peak",
        "router share",
        "host syncs/step",
        f"syncs in {REMOE_SCOPE}",
    ]
    rows = []
    for r in report["results"]:
        label = r.label
        if r.settled_after_steps is not None:
            label += f", after {r.settled_after_steps} settling steps"
        active = f"{r.active_experts_per_token:.2f}"
        if r.sparsity is not None:
            active += f" (sparsity {r.sparsity:.3f})"
        rows.append(
            [
                label,
                active,
                f"{r.median_ms:.1f}",
                f"{r.p25_ms:.1f}-{r.p75_ms:.1f}",
                f"{r.tokens_per_s:,.0f}",
                f"{r.model_tflops:.3g}",
                "-" if r.mfu is None else f"{100 * r.mfu:.1f}%",
                _memory(r.peak_memory),
                _memory(r.step_memory),
                "-" if r.router_share is None else f"{100 * r.router_share:.1f}%",
                f"{r.syncs_per_step:g}",
                f"{r.remoe_syncs_per_step:g}",
            ]
        )
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines.append("")
    lines += _syncs_by_source_table(report["results"])
    lines.append("")
    noisy = False
    for name, value in report["ratios"].items():
        verdict = "<= 1.00 within spread" if value["at_most_1"] else "> 1.00"
        if name.endswith(f"/ {_title_of(lambda kind: not kind.is_moe)}"):
            verdict = ""  # MoE against dense: a cost, no claim to check
        if not value.get("meaningful", True):
            verdict, noisy = "not meaningful: the step times spread too much", True
        lines.append(
            f"{name}: {value['ratio']:.3f} (spread +-{100 * value['spread']:.1f}%)"
            + (f"  {verdict}" if verdict else "")
        )
    if noisy:
        lines.append(
            f"A spread over +-{100 * MEANINGFUL_SPREAD:.0f}% means the machine was busy "
            "(other processes, clock changes): rerun on an idle machine, or with more "
            "--steps and --rounds."
        )
    return "\n".join(lines)


def _syncs_by_source_table(results: list) -> list:
    """Host syncs per step by source, one row per measured phase."""
    sources = [name for name, _ in SOURCES] + [OUTSIDE_SCOPES]
    present = [s for s in sources if any(r.syncs_by_source.get(s) for r in results)]
    header = ["host syncs/step by source", *present, "all"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        counts = [f"{r.syncs_by_source.get(s, 0):g}" for s in present]
        lines.append("| " + " | ".join([r.label, *counts, f"{r.syncs_per_step:g}"]) + " |")
    return lines


def to_json(report: dict) -> dict:
    return {**report, "results": [{**asdict(r), "label": r.label} for r in report["results"]]}
