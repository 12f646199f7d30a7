"""The pretraining loop on megatron-core, driven by Megatron-LM-style arguments.

``pretrain(args)`` does, in order: validate everything that can be checked before writing
anything (layout, batch sizes, data paths, tokenizer); start the parallel groups; build this
rank's model chunk, megatron's DDP, optimizer and LR scheduler; resume from ``--load``; then
train, evaluate, log and checkpoint. After every optimizer step the ReMoE coefficient updates
from the step's sparsity (averaged over layers, micro-batches, data-parallel ranks and stages).

The flags mean the same on every device: ``--bf16`` is megatron-core's bf16 mixed precision
(``Float16Module``, fp32 main weights), ``--use-distributed-optimizer`` its distributed
optimizer, the overlap flags overlap its communication; on CPU they run the same code with gloo.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from megatron.core import parallel_state
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer.module import Float16Module

from remoe_patches import checkpointing
from remoe_patches.arguments import (
    model_config_from_args,
    parallel_config_from_args,
    transformer_overrides_from_args,
)
from remoe_patches.config import ConfigError, ModelConfig
from remoe_patches.data import (
    build_splits,
    check_data_paths,
    drop_empty_splits,
    micro_batches,
    to_device,
)
from remoe_patches.exit_signals import ExitSignals
from remoe_patches.flops import training_flops_per_token
from remoe_patches.megatron_fixes import initialize_adam_state
from remoe_patches.metrics_log import MetricsLog
from remoe_patches.model import HAVE_TE, build_model, build_regularizer
from remoe_patches.parallel import initialize_parallel
from remoe_patches.regularizer import AdaptiveL1
from remoe_patches.routing_health import RoutingHealth, collapsed_layers, dead_experts
from remoe_patches.router import REG_LOSS_NAME, reduce_aux_loss_tracker
from remoe_patches.tokenizer import build_tokenizer, vocab_size_with_padding
from remoe_patches.training_step import forward_backward, sync_params, wrap_with_ddp

class TrainingStopped(RuntimeError):
    """Training cannot go on (too many non-finite steps in a row)."""


@dataclass
class RunState:
    """Where the run stands; what a checkpoint restores besides the objects' own state."""

    iteration: int = 0
    start_iteration: int = 0  # where this launch began (a resumed run's checkpoint)
    consumed_samples: int = 0
    skipped_iterations: int = 0
    skipped_in_a_row: int = 0
    history: list = field(default_factory=list)  # per-step records (returned to callers)


def check_batch_sizes(args, data_parallel_size: int) -> int:
    """The number of micro-batches per step; one clear error when the sizes do not fit."""
    per_step = args.micro_batch_size * data_parallel_size
    if args.global_batch_size % per_step:
        raise ConfigError(
            f"--global-batch-size {args.global_batch_size} is not divisible by --micro-batch-size "
            f"{args.micro_batch_size} x data-parallel size {data_parallel_size}; make it a "
            f"multiple of {per_step}"
        )
    return args.global_batch_size // per_step


def pretrain(args) -> RunState:
    """Train as ``args`` say; return the final state (with the per-step history)."""
    use_cuda = torch.cuda.is_available()
    if args.train_iters is None:  # --train-samples
        args.train_iters = -(-args.train_samples // args.global_batch_size)
    parallel = parallel_config_from_args(args)
    # Checks that need no process group come first, so bad input writes nothing anywhere.
    for blend in data_blends(args):
        check_data_paths(blend)
    fresh_run = check_load_path(args)
    tokenizer = build_tokenizer(
        args.tokenizer_type,
        vocab_file=args.vocab_file,
        merge_file=args.merge_file,
        tokenizer_model=args.tokenizer_model,
    )
    initialize_parallel(parallel, seed=args.seed, timeout_minutes=args.distributed_timeout_minutes)
    world_size = dist.get_world_size()
    dp_size = parallel.data_parallel_size(world_size)
    num_microbatches = check_batch_sizes(args, dp_size)

    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    vocab_size = vocab_size_with_padding(
        tokenizer.vocab_size, args.make_vocab_size_divisible_by,
        parallel.tensor_model_parallel_size,
    )
    objects = build_training_objects(args, parallel, vocab_size=vocab_size, device=device)
    model_config, model_chunks = objects.model_config, objects.model_chunks
    optimizer, scheduler, regularizer = objects.optimizer, objects.scheduler, objects.regularizer

    state = RunState()
    is_logging_rank = dist.get_rank() == world_size - 1
    log = signals = None
    try:
        if args.load:
            # --finetune takes the weights only: a new run starts from them (as Megatron-LM).
            fresh_start = bool(args.finetune)
            restored = checkpointing.load_checkpoint(
                args.load, model_chunks, optimizer, scheduler, regularizer=regularizer,
                load_optimizer=not (args.no_load_optim or fresh_start),
                load_rng=not (args.no_load_rng or fresh_start),
                load_training_state=not fresh_start,
            )
            if restored is not None and not fresh_start:
                state.iteration = state.start_iteration = restored["iteration"]
                state.consumed_samples = restored["consumed_samples"]
            if is_logging_rank:
                _report_load(args, restored, regularizer, fresh_run)
        if args.train_iters == 0:  # save the initial weights, e.g. to start several layouts
            if args.save:
                _save(args, state, model_chunks, optimizer, scheduler, regularizer, dp_size)
            return state

        split = args.split
        if args.data_path is not None:
            split, dropped = drop_empty_splits(args.data_path, args.split)
            for name in dropped:
                if dist.get_rank() == 0:
                    print(f" note: the {name} split of --split {args.split} holds no document "
                          "of the data; it is skipped", flush=True)
        splits = build_splits(
            data_path=args.data_path, split=split,
            per_split_paths=(args.train_data_path, args.valid_data_path, args.test_data_path), seq_length=args.seq_length,
            tokenizer=tokenizer, num_samples=num_samples(args), seed=args.seed,
            mock=args.mock_data, cache_path=args.data_cache_path,
        )
        dp_rank = parallel_state.get_data_parallel_rank()

        def batches_of(dataset, consumed):
            for batch in micro_batches(dataset, consumed_samples=consumed,
                                       micro_batch_size=args.micro_batch_size,
                                       data_parallel_rank=dp_rank, data_parallel_size=dp_size):
                yield to_device(batch, device)

        log = MetricsLog(
            metrics_dir=args.save, tensorboard_dir=args.tensorboard_dir,
            total_iterations=args.train_iters, start_iteration=state.iteration,
            enabled=is_logging_rank,
        )
        train_batches = batches_of(splits.train, state.consumed_samples)
        step_kwargs = dict(num_microbatches=num_microbatches, seq_length=args.seq_length,
                           micro_batch_size=args.micro_batch_size)
        window = []  # step records since the last log line
        run_started = time.time()
        signals = ExitSignals() if args.exit_signal_handler else None
        saved_at = None
        health = RoutingHealth()
        while state.iteration < args.train_iters:
            started = time.perf_counter()
            record = train_step(model_chunks, optimizer, scheduler, regularizer, train_batches,
                                step_kwargs, args)
            state.iteration += 1
            state.consumed_samples += args.global_batch_size
            _count_skips(state, record, args)
            record.update(iteration=state.iteration, step_seconds=time.perf_counter() - started)
            state.history.append(record)
            window.append(record)
            log.advance()
            if state.iteration % args.log_interval == 0 or state.iteration == args.train_iters:
                log_window(log, window, args, state, model_config, world_size, health)
                window = []
            if args.eval_interval and state.iteration % args.eval_interval == 0 and splits.valid:
                val = evaluate(model_chunks, batches_of(splits.valid, 0), args, step_kwargs)
                log.evaluation(dict(iteration=state.iteration, val_lm_loss=val))
                state.history[-1]["val_lm_loss"] = val
            if args.save and args.save_interval and state.iteration % args.save_interval == 0:
                _save(args, state, model_chunks, optimizer, scheduler, regularizer, dp_size, log)
                saved_at = state.iteration
            reason = _exit_reason(args, state, run_started, signals, device)
            if reason:
                log.print(f" exiting at iteration {state.iteration}: {reason}")
                break
        if health.summary():
            log.print(health.summary())
        sync_params(model_chunks)  # callers of pretrain() see the final weights
        if args.save and saved_at != state.iteration:
            _save(args, state, model_chunks, optimizer, scheduler, regularizer, dp_size, log)
        if splits.test is not None and args.eval_iters:
            test = evaluate(model_chunks, batches_of(splits.test, 0), args, step_kwargs)
            log.evaluation(dict(iteration=state.iteration, test_lm_loss=test))
            if state.history:
                state.history[-1]["test_lm_loss"] = test
        if args.save:
            log.print(f" metrics: {log.metrics_path}")
            log.print(f" checkpoint: {checkpointing.checkpoint_dir(args.save, state.iteration)}")
        if args.tensorboard_dir:
            log.print(f" tensorboard: {args.tensorboard_dir}")
    finally:
        if signals is not None:
            signals.close()
        if log is not None:
            log.close()
    return state


def check_load_path(args) -> bool:
    """Refuse a ``--load`` that holds no checkpoint, unless it is also ``--save`` (a run that
    resumes itself, launched for the first time); return whether the run starts from scratch."""
    if not args.load or checkpointing.has_checkpoint(args.load):
        return False
    same_as_save = args.save and os.path.realpath(args.save) == os.path.realpath(args.load)
    if same_as_save and not args.finetune:
        return True
    missing = "does not exist" if not os.path.exists(args.load) else "holds no checkpoint"
    raise ConfigError(
        f"--load {args.load} {missing} (no {checkpointing.LATEST_FILE}, no iter_XXXXXXX); "
        "point it at the --save directory of a run, or drop --load to train from scratch "
        "(with --load equal to --save, a first launch starts from scratch by itself)"
    )


def _report_load(args, restored, regularizer, fresh_run) -> None:
    """Say before the first step where the run starts from."""
    if fresh_run:
        print(f" note: no checkpoint in {args.load} yet: training from scratch", flush=True)
        return
    for directory, problem in restored["skipped"]:
        print(f" WARNING: checkpoint {directory} does not load ({problem}); using the previous "
              "one", flush=True)
    if args.finetune:
        print(f" loaded the weights of {restored['directory']} (iteration "
              f"{restored['iteration']}) for a new run (--finetune)", flush=True)
        return
    details = [f"iteration {restored['iteration']}",
               f"consumed samples {restored['consumed_samples']:,}"]
    if regularizer is not None:
        details.append(f"l1 coeff {float(regularizer.coeff):.4E}")
    weights_only = " (weights only: --no-load-optim)" if args.no_load_optim else ""
    print(f" resuming from {restored['directory']}: {', '.join(details)}{weights_only}",
          flush=True)


@dataclass
class TrainingObjects:
    """What one rank trains with: its model chunks (in megatron's DDP), optimizer, LR schedule
    and the ReMoE coefficient (None for dense and TopK models)."""

    model_config: ModelConfig
    model_chunks: list
    optimizer: object
    scheduler: OptimizerParamScheduler
    regularizer: Optional[AdaptiveL1]


def build_training_objects(args, parallel, *, vocab_size: int, device) -> TrainingObjects:
    """This rank's model, DDP, optimizer and schedule as the flags say (megatron's parallel groups
    must be initialized), the same on every device."""
    use_cuda = device.type == "cuda"
    model_config = model_config_from_args(args, vocab_size=vocab_size)
    bf16 = bool(args.bf16)
    use_te = HAVE_TE and args.transformer_impl == "transformer_engine"
    regularizer = build_regularizer(model_config, device=device)
    built = build_model(
        model_config, parallel, bf16=bf16,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        regularizer=regularizer,
        use_transformer_engine=use_te,
        **transformer_overrides_from_args(
            args, cuda_available=use_cuda, transformer_engine_available=use_te
        ),
    )
    model = built.model.to(device)
    if bf16:
        model = Float16Module(built.transformer_config, model)
    ddp = wrap_with_ddp(
        model, built.transformer_config,
        use_distributed_optimizer=bool(args.use_distributed_optimizer),
        overlap_grad_reduce=bool(args.overlap_grad_reduce),
        overlap_param_gather=bool(args.overlap_param_gather),
    )
    optimizer = get_megatron_optimizer(optimizer_config(args), [ddp])
    initialize_adam_state(optimizer)
    return TrainingObjects(
        model_config=model_config, model_chunks=[ddp], optimizer=optimizer,
        scheduler=lr_scheduler(args, optimizer), regularizer=regularizer,
    )


def optimizer_config(args) -> OptimizerConfig:
    return OptimizerConfig(
        optimizer="adam",
        lr=args.lr,
        min_lr=args.min_lr,
        weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2,
        adam_eps=args.adam_eps,
        clip_grad=args.clip_grad,
        bf16=bool(args.bf16),
        params_dtype=torch.bfloat16 if args.bf16 else torch.float32,
        use_distributed_optimizer=bool(args.use_distributed_optimizer),
        overlap_param_gather=bool(args.overlap_param_gather),
    )


def data_blends(args) -> list:
    """The ``--data-path`` blend, or the per-split ones, that must exist on disk."""
    if args.mock_data:
        return []
    if args.data_path is not None:
        return [args.data_path]
    blends = [b for b in (args.train_data_path, args.valid_data_path, args.test_data_path) if b]
    if not blends:
        raise ConfigError("no training data: give --data-path (or --mock-data, --demo-corpus)")
    return blends


def lr_scheduler(args, optimizer) -> OptimizerParamScheduler:
    """Megatron-LM's schedule, counted in samples: warm-up, then decay to --min-lr."""
    decay_iters = args.lr_decay_iters or args.train_iters
    if decay_iters == 0:  # --train-iters 0: nothing will be trained
        decay_iters = 1
    decay_samples = decay_iters * args.global_batch_size
    if args.lr_warmup_fraction is not None:
        warmup_samples = int(args.lr_warmup_fraction * decay_samples)
    else:
        warmup_samples = args.lr_warmup_iters * args.global_batch_size
    if warmup_samples >= decay_samples:
        raise ConfigError(
            f"the LR warm-up ({warmup_samples // args.global_batch_size} iterations) must end "
            f"before the decay does ({decay_iters} iterations); shorten --lr-warmup-iters/"
            "--lr-warmup-fraction or lengthen --train-iters/--lr-decay-iters"
        )
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=args.lr,
        min_lr=args.min_lr,
        lr_warmup_steps=warmup_samples,
        lr_decay_steps=decay_samples,
        lr_decay_style=args.lr_decay_style,
        start_wd=args.weight_decay,
        end_wd=args.weight_decay,
        wd_incr_steps=args.train_iters * args.global_batch_size,
        wd_incr_style="constant",
    )


def num_samples(args) -> tuple[int, int, int]:
    """Samples each split must provide. Every evaluation reads the same first ``--eval-iters``
    global batches of its split, so validation losses compare across iterations."""
    per_evaluation = max(args.eval_iters, 1) * args.global_batch_size
    return args.train_iters * args.global_batch_size, per_evaluation, per_evaluation


def train_step(model_chunks, optimizer, scheduler, regularizer, train_batches, step_kwargs, args):
    """One optimizer step (or a skipped one); returns the step's record of tensors/floats."""
    optimizer.zero_grad()
    batches = [next(train_batches) for _ in range(step_kwargs["num_microbatches"])]
    losses = forward_backward(model_chunks, batches, **step_kwargs)
    lm_loss = losses["lm_loss"]
    tracked = reduce_aux_loss_tracker(step_kwargs["num_microbatches"])

    optimizer.prepare_grads()
    grad_norm = float(optimizer.get_grad_norm() or 0.0)
    loss_bad = torch.tensor(
        0.0 if not parallel_state.is_pipeline_last_stage() else float(not torch.isfinite(lm_loss)),
        device=lm_loss.device,
    )
    dist.all_reduce(loss_bad, op=dist.ReduceOp.MAX)
    finite = loss_bad.item() == 0.0 and math.isfinite(grad_norm)

    record = dict(lm_loss=lm_loss, grad_norm=grad_norm, skipped=not finite,
                  lr=optimizer.param_groups[0]["lr"])
    if finite:
        optimizer.step()
        scheduler.step(increment=args.global_batch_size)
    if regularizer is not None:
        groups = dict(data_parallel_group=parallel_state.get_data_parallel_group(),
                      pipeline_parallel_group=parallel_state.get_pipeline_model_parallel_group())
        coeff_used = regularizer.coeff
        # A skipped step's sparsity is not trusted: it is consumed without an update.
        step = regularizer.finish_step(**groups) if finite else regularizer.step_sparsity(**groups)
        record.update(
            sparsity=step.mean, sparsity_L=step.per_layer_L, l1_coeff=coeff_used,
            reg_loss_L=tracked.get(REG_LOSS_NAME),
            expert_load=regularizer.take_expert_load(**groups).fraction_LE,
        )
    elif "load_balancing_loss" in tracked:
        record["load_balancing_loss_L"] = tracked["load_balancing_loss"]
    return record


def _count_skips(state: RunState, record: dict, args) -> None:
    if not record["skipped"]:
        state.skipped_in_a_row = 0
        return
    state.skipped_iterations += 1
    state.skipped_in_a_row += 1
    if state.skipped_in_a_row > args.max_skipped_steps:
        raise TrainingStopped(
            f"{state.skipped_in_a_row} steps in a row had a non-finite loss or gradient "
            f"(iteration {state.iteration}); lower --lr or check the data, or raise "
            "--max-skipped-steps"
        )


@torch.no_grad()
def evaluate(model_chunks, batches, args, step_kwargs) -> float:
    """Token-mean LM loss over ``--eval-iters`` global batches from the split's start."""
    sync_params(model_chunks)  # the weights of the last step, on every rank
    for chunk in model_chunks:
        chunk.eval()
    total, count = 0.0, 0
    for _ in range(args.eval_iters):
        step_batches = [next(batches) for _ in range(step_kwargs["num_microbatches"])]
        loss = forward_backward(model_chunks, step_batches, forward_only=True, **step_kwargs)
        total += float(loss["lm_loss"])
        count += 1
    for chunk in model_chunks:
        chunk.train()
    loss = torch.tensor(total / max(count, 1))
    # only the last stage computed it; everyone reports the same value
    group = parallel_state.get_pipeline_model_parallel_group()
    if dist.get_world_size(group) > 1:
        last = parallel_state.get_pipeline_model_parallel_last_rank()
        loss = loss.to(torch.cuda.current_device())
        dist.broadcast(loss, src=last, group=group)
    return float(loss)


def log_window(log, window, args, state, model_config, world_size, health=None) -> None:
    """Average the window's step records into one; report changes of the routing's health."""
    records = [r for r in window if not r["skipped"]] or window
    last = window[-1]
    seconds = sum(r["step_seconds"] for r in window) / len(window)
    tokens_per_step = args.global_batch_size * args.seq_length
    out = dict(
        iteration=state.iteration,
        train_iters=args.train_iters,
        consumed_samples=state.consumed_samples,
        ms_per_iteration=1000 * seconds,
        tokens_per_sec=tokens_per_step / seconds,
        lr=float(last["lr"]),
        global_batch_size=args.global_batch_size,
        lm_loss=_mean(float(r["lm_loss"]) for r in records),
        grad_norm=_mean(r["grad_norm"] for r in records),
        skipped_iterations=state.skipped_iterations,
    )
    if model_config.router == "relu":
        sparsity_L = torch.stack([r["sparsity_L"] for r in records]).mean(0)
        moe_layers = ~torch.isnan(sparsity_L)
        out.update(
            reg_loss=_mean(float(r["reg_loss_L"][moe_layers].mean()) for r in records),
            l1_coeff=float(last["l1_coeff"]),
            sparsity=_mean(float(r["sparsity"]) for r in records),
            sparsity_min=float(sparsity_L[moe_layers].min()),
            sparsity_max=float(sparsity_L[moe_layers].max()),
            sparsity_per_layer=[float(v) for v in sparsity_L[moe_layers]],
        )
        active = (1.0 - out["sparsity"]) * model_config.total_experts
        collapsed = collapsed_layers(sparsity_L)
        dead = dead_experts(torch.stack([r["expert_load"] for r in records]).nanmean(0))
        # Every window's state goes to metrics.jsonl; the console hears only of changes.
        out["dead_experts"] = len(dead)
        out["dead_experts_per_layer"] = [sorted(e for l, e in dead if l == layer + 1)
                                         for layer in torch.nonzero(moe_layers).flatten().tolist()]
        out["collapsed_layers"] = len(collapsed)
        if health is not None:
            for line in health.update(state.iteration, dead, collapsed, len(records)):
                log.print(line)
    elif model_config.router == "topk":
        active = model_config.total_topk
        if "load_balancing_loss_L" in last:
            out["load_balancing_loss"] = _mean(
                float(r["load_balancing_loss_L"].sum() / model_config.num_layers) for r in records)
    else:
        active = 0.0
    flops = training_flops_per_token(model_config, active) * tokens_per_step
    out["tflops_per_gpu"] = flops / seconds / world_size / 1e12
    log.step(out)


def _exit_reason(args, state, run_started, signals, device) -> Optional[str]:
    """Why the run stops after this step (every rank gets the same answer), or None."""
    if signals is not None:
        received = signals.received(device)
        if received:
            return f"received {received} (--exit-signal-handler)"
    if args.exit_interval and state.iteration % args.exit_interval == 0:
        return f"--exit-interval {args.exit_interval}"
    if args.exit_duration_in_mins:
        over = time.time() - run_started > 60 * args.exit_duration_in_mins
        over = torch.tensor(float(over), device=device)
        dist.all_reduce(over, op=dist.ReduceOp.MAX)  # every rank stops at the same step
        if over.item():
            return f"--exit-duration-in-mins {args.exit_duration_in_mins}"
    return None


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def _save(args, state, model_chunks, optimizer, scheduler, regularizer, dp_size,
          log=None) -> None:
    saved_args = {k: v for k, v in vars(args).items() if _plain(v)}
    saved_args["data_parallel_size"] = dp_size
    started = time.perf_counter()
    directory = checkpointing.save_checkpoint(
        args.save, state.iteration, model_chunks, None if args.no_save_optim else optimizer,
        scheduler,
        consumed_samples=state.consumed_samples, regularizer=regularizer, args=saved_args,
    )
    if log is not None:
        log.print(f" saved checkpoint {directory} ({time.perf_counter() - started:.1f} s)")


def _plain(value) -> bool:
    return value is None or isinstance(value, (bool, int, float, str)) or (
        isinstance(value, (list, tuple)) and all(isinstance(v, (int, float, str)) for v in value))
