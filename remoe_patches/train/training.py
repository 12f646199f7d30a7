"""The pretraining loop on megatron-core, driven by a ``RunConfig``.

``pretrain(config)`` does, in order: validate everything that can be checked before writing
anything (layout, batch sizes, data paths, tokenizer); start the parallel groups; build this
rank's model chunk, megatron's DDP, optimizer and LR scheduler; resume from ``--load``; then
train, evaluate, log and checkpoint. After every optimizer step the ReMoE coefficient updates
from the step's sparsity (averaged over layers, micro-batches, data-parallel ranks and stages).

The flags mean the same on every device: ``--bf16`` is megatron-core's bf16 mixed precision
(``Float16Module``, fp32 main weights), ``--use-distributed-optimizer`` its distributed
optimizer, the overlap flags overlap its communication; on CPU they run the same code with gloo.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from megatron.core import parallel_state
from megatron.core.num_microbatches_calculator import (
    get_current_global_batch_size,
    get_num_microbatches,
    update_num_microbatches,
)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer.module import Float16Module

from remoe_patches.train import checkpointing, expert_load, profiling, step_timers, wandb_log
from remoe_patches.model.routers import lory_layer
from remoe_patches.runs import run_directory
from remoe_patches.train.batch_rampup import check_rampup_fits, samples_after, start_calculator
from remoe_patches.config.model_config import ConfigError
from remoe_patches.data.gpt_datasets import (
    build_splits,
    check_data_paths,
    check_token_ids,
    drop_empty_splits,
    evaluation_batches,
    micro_batches,
    to_device,
)
from remoe_patches.data.domains import evaluation_domains
from remoe_patches.train.exit_signals import ExitSignals
from remoe_patches.train.expert_load import ExpertLoad
from remoe_patches.train.flops import training_flops_per_token
from remoe_patches.runtime.megatron_fixes import initialize_adam_state
from remoe_patches.train.memory_usage import memory_record
from remoe_patches.train.metrics_log import MetricsLog, format_step_line
from remoe_patches.model.build import (
    build_model_for_run,
    build_regularizer,
    transformer_impl_in_use,
)
from remoe_patches.runtime.parallel import initialize_parallel, local_device
from remoe_patches.routing.regularizer import AdaptiveL1
from remoe_patches.train.routing_health import RoutingHealth, collapsed_layers, dead_experts
from remoe_patches.config.run_config import RunConfig, TrainingConfig
from remoe_patches.data.tokenizer import build_tokenizer, vocab_size_with_padding
from remoe_patches.train.training_step import (
    StepRecord,
    forward_backward,
    sync_params,
    train_step,
    wrap_with_ddp,
)


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


def check_batch_sizes(training: TrainingConfig, data_parallel_size: int) -> TrainingConfig:
    """``training`` with its global batch size filled in (default: micro-batch x data-parallel
    size); one clear error when the sizes do not fit."""
    per_step = training.micro_batch_size * data_parallel_size
    global_batch_size = training.global_batch_size or per_step
    if global_batch_size % per_step:
        raise ConfigError(
            f"--global-batch-size {global_batch_size} is not divisible by --micro-batch-size "
            f"{training.micro_batch_size} x data-parallel size {data_parallel_size}; make it a "
            f"multiple of {per_step}"
        )
    if training.rampup_batch_size is not None:
        check_rampup_fits(training.rampup_batch_size, training.micro_batch_size, data_parallel_size)
    return dataclasses.replace(training, global_batch_size=global_batch_size)


def pretrain(config: RunConfig, arguments: Sequence[str] = ()) -> RunState:
    """Train as ``config`` says; return the final state (with the per-step history).
    ``arguments``: the launch's resolved-arguments listing, kept in ``<save>/arguments.txt``."""
    # Checks that need no process group come first, so bad input writes nothing anywhere.
    skip_train = config.logging.skip_train  # evaluate --load, write nothing
    if config.checkpoint.save and not skip_train:
        checkpointing.check_writer_dependencies()
    for blend in config.data.blends():
        check_data_paths(blend)
    fresh_run = check_load_path(config)
    if not skip_train:
        check_save_path(config)
    data = config.data
    tokenizer = build_tokenizer(
        data.tokenizer_type,
        vocab_file=data.vocab_file,
        merge_file=data.merge_file,
        tokenizer_model=data.tokenizer_model,
    )
    training = config.training
    initialize_parallel(
        config.parallel, seed=training.seed, timeout_minutes=training.distributed_timeout_minutes
    )
    world_size = dist.get_world_size()
    dp_size = config.parallel.data_parallel_size(world_size)
    device = local_device()
    vocab_size = vocab_size_with_padding(
        tokenizer.vocab_size,
        data.make_vocab_size_divisible_by,
        config.parallel.tensor_model_parallel_size,
    )
    check_token_ids(
        data_blends(data),
        vocab_size,
        tokenizer=describe_tokenizer(data, tokenizer),
        cache_dir=data.data_cache_path,
    )
    # The run as it is trained (and saved): the padded vocabulary, the global batch size, the
    # layers actually built (a checkpoint says 'local' when TE was asked for but absent).
    config = config.replace(
        model=dict(vocab_size=vocab_size),
        training=check_batch_sizes(training, dp_size),
        layers=dict(transformer_impl=transformer_impl_in_use(config.layers.transformer_impl)),
    )
    training, ckpt, logging = config.training, config.checkpoint, config.logging
    num_microbatches = training.global_batch_size // (training.micro_batch_size * dp_size)
    # the training steps' batches: megatron-core's calculator (--rampup-batch-size grows them)
    start_calculator(
        rank=dist.get_rank(),
        rampup=training.rampup_batch_size,
        global_batch_size=training.global_batch_size,
        micro_batch_size=training.micro_batch_size,
        data_parallel_size=dp_size,
    )
    objects = build_training_objects(config, device=device)
    model_chunks = objects.model_chunks
    optimizer, scheduler, regularizer = objects.optimizer, objects.scheduler, objects.regularizer

    state = RunState()
    is_logging_rank = dist.get_rank() == world_size - 1
    log = signals = profiler = None
    timers = step_timers.build_timers(logging.timing_log_level, logging.timing_log_option)
    hooks = step_timers.install(timers, model_chunks, optimizer) if timers else []
    routing_load = None
    if config.model.is_moe:
        routing_load = ExpertLoad(config.model.num_layers, config.model.total_experts, device)
        hooks += expert_load.attach(model_chunks, routing_load)

    # --async-save needs the persistent writer, as in Megatron-LM (its flag declaration notes it)
    async_saves = (
        checkpointing.AsyncSaves(persistent=True)
        if ckpt.async_save and ckpt.use_persistent_ckpt_worker
        else None
    )

    def saved_in_background(log, blocking=False):
        for directory in async_saves.finalize(blocking=blocking) if async_saves else ():
            if log is not None:
                log.print(f" saved checkpoint {directory} (written in the background)")

    def save(log=None):
        saved_in_background(log, blocking=True)  # one background save at a time
        _save(
            config,
            state,
            model_chunks,
            optimizer,
            scheduler,
            regularizer,
            dp_size,
            log,
            async_saves,
        )

    try:
        if ckpt.load:
            # --finetune takes the weights only: a new run starts from them (as Megatron-LM).
            fresh_start = ckpt.finetune
            restored = checkpointing.load_checkpoint(
                ckpt.load,
                model_chunks,
                optimizer,
                scheduler,
                regularizer=regularizer,
                load_optimizer=not (ckpt.no_load_optim or fresh_start or skip_train),
                load_rng=not (ckpt.no_load_rng or fresh_start),
                load_training_state=not fresh_start,
                model_config=config.model,
                fully_parallel=ckpt.ckpt_fully_parallel_load,
            )
            if restored is not None and not fresh_start:
                state.iteration = state.start_iteration = restored["iteration"]
                state.consumed_samples = restored["consumed_samples"]
            if is_logging_rank:
                _report_load(ckpt, restored, regularizer, fresh_run, skip_train)
        # --train-iters 0: save the initial weights, e.g. to start several layouts
        if training.train_iters == 0 and not skip_train:
            if ckpt.save:
                save()
                saved_in_background(None, blocking=True)
            return state

        split = data.split
        if data.data_path is not None:
            split, dropped = drop_empty_splits(data.data_path, data.split)
            for name in dropped:
                if dist.get_rank() == 0:
                    print(
                        f" note: the {name} split of --split {data.split} holds no document "
                        "of the data; it is skipped",
                        flush=True,
                    )
        splits = build_splits(
            data_path=data.data_path,
            split=split,
            per_split_paths=(data.train_data_path, data.valid_data_path, data.test_data_path),
            seq_length=config.model.seq_length,
            tokenizer=tokenizer,
            num_samples=num_samples(config),
            seed=training.seed,
            mock=data.mock_data,
            cache_path=data.data_cache_path,
        )
        dp_rank = parallel_state.get_data_parallel_rank()
        domains = evaluation_domains(
            logging.eval_domains, logging.eval_domain_key, val=splits.valid, test=splits.test
        )

        def batches_of(dataset, consumed):
            for batch in micro_batches(
                dataset,
                consumed_samples=consumed,
                micro_batch_size=training.micro_batch_size,
                data_parallel_rank=dp_rank,
                data_parallel_size=dp_size,
            ):
                yield to_device(batch, device)

        step_kwargs = dict(
            seq_length=config.model.seq_length, micro_batch_size=training.micro_batch_size
        )

        def evaluation(name, dataset):
            """The ``<name>_lm_loss`` record of the split's first --eval-iters global batches, or
            of all its samples (--full-validation)."""
            samples = len(dataset) if logging.full_validation else logging.eval_iters * batch
            collect_garbage(training, evaluation=True)
            batches = (
                to_device(b, device)
                for b in evaluation_batches(
                    dataset,
                    num_samples=samples,
                    global_batch_size=batch,
                    micro_batch_size=training.micro_batch_size,
                    data_parallel_rank=dp_rank,
                    data_parallel_size=dp_size,
                    token_domains=domains.get(name),
                )
            )
            per_step = [min(batch, samples - start) for start in range(0, samples, batch)]
            domain_names = domains[name].names if name in domains else ()
            loss, per_domain = evaluate(
                model_chunks,
                batches,
                num_microbatches,
                per_step,
                device,
                global_batch_size=batch,
                domain_names=domain_names,
                **step_kwargs,
            )
            collect_garbage(training, evaluation=True)
            record = {
                "iteration": state.iteration,
                f"{name}_lm_loss": loss,
                f"{name}_samples": samples,
            }
            if per_domain:
                record[f"{name}_lm_loss_per_domain"] = per_domain
            return record

        batch = training.global_batch_size
        evaluates = logging.full_validation or logging.eval_iters > 0
        log = MetricsLog(
            # --skip-train writes nothing: its losses go to the console only
            metrics_dir=None if skip_train else ckpt.save,
            tensorboard_dir=None if skip_train else logging.tensorboard_dir,
            total_iterations=training.train_iters,
            start_iteration=state.iteration,
            enabled=is_logging_rank,
            per_layer=logging.moe_per_layer_logging,
            timers=logging.log_timers_to_tensorboard,
            memory=logging.log_memory_to_tensorboard,
            wandb_run=wandb_log.open_wandb_run(logging, save=ckpt.save, config=config.to_dict())
            if is_logging_rank and not skip_train
            else None,
        )
        if skip_train:
            for name, dataset in (("val", splits.valid), ("test", splits.test)):
                if dataset is not None and evaluates:
                    log.evaluation(evaluation(name, dataset))
            return state
        # the checks behind it: a refused run writes nothing
        if arguments and ckpt.save and dist.get_rank() == 0:
            run_directory.write_arguments(ckpt.save, arguments)
        train_batches = batches_of(splits.train, state.consumed_samples)
        window = []  # step records since the last log line
        run_started = time.time()
        if training.manual_gc:  # collections at the same steps on every rank (Megatron-LM's)
            gc.disable()
            gc.collect()
        signals = ExitSignals() if training.exit_signal_handler else None
        profiler = profiling.StepProfiler.for_run(
            logging, rank=dist.get_rank(), save=ckpt.save, device=device
        )
        profiling.start_memory_history(logging, device)
        saved_at = None
        health = RoutingHealth()
        # Lory's dense warm-up: dense until step lory_warmup, then every expert a copy of the FFN
        lory_warmup = lory_layer.dense_warmup_steps(
            getattr(config.model.router_options, "dense_warmup_fraction", 0.0), training.train_iters
        )
        lory_layer.set_dense_warmup(model_chunks, state.iteration < lory_warmup)
        while state.iteration < training.train_iters:
            if lory_warmup and state.iteration == lory_warmup:
                lory_layer.start_experts_from_the_dense_ffn(model_chunks, optimizer)
            if profiler:
                profiler.before_step(state.iteration)
            started = time.perf_counter()
            update_num_microbatches(state.consumed_samples, consistency_check=True)
            step_batch = get_current_global_batch_size()
            with timers.phase("batch-generator") if timers else contextlib.nullcontext():
                batches = [next(train_batches) for _ in range(get_num_microbatches())]
            record = train_step(
                model_chunks,
                optimizer,
                scheduler,
                regularizer,
                batches,
                global_batch_size=step_batch,
                timers=timers,
                **step_kwargs,
            )
            state.iteration += 1
            if profiler:
                profiler.after_step(state.iteration)
            state.consumed_samples += step_batch
            saved_in_background(log)
            collect_garbage(training, iteration=state.iteration)
            _count_skips(state, record, training.max_skipped_steps)
            record.iteration = state.iteration
            record.step_seconds = time.perf_counter() - started
            state.history.append(record)
            window.append(record)
            log.advance()
            if (
                state.iteration % logging.log_interval == 0
                or state.iteration == training.train_iters
            ):
                log_window(
                    log,
                    window,
                    config,
                    state,
                    world_size,
                    health,
                    routing_load=routing_load,
                    timers=timers,
                    device=device,
                )
                window = []
                profiling.write_memory_snapshot(
                    logging, is_last_rank=dist.get_rank() == dist.get_world_size() - 1
                )
            elif state.iteration - state.start_iteration in EARLY_LINES:
                # a launch's first steps on the console too (not in metrics.jsonl, whose records
                # stay one per --log-interval window): a sign of life, and stage I's dense dip
                log_window(log, [record], config, state, world_size, console_only=True)
            if (
                logging.eval_interval
                and state.iteration % logging.eval_interval == 0
                and splits.valid
                and evaluates
            ):
                result = evaluation("val", splits.valid)
                record.val_lm_loss = result["val_lm_loss"]
                log.evaluation(result)
            if ckpt.save and ckpt.save_interval and state.iteration % ckpt.save_interval == 0:
                save(log)
                saved_at = state.iteration
            reason = _exit_reason(training, state, run_started, signals, device)
            if reason:
                log.print(f" exiting at iteration {state.iteration}: {reason}")
                break
        if health.summary():
            log.print(health.summary())
        sync_params(model_chunks)  # callers of pretrain() see the final weights
        if ckpt.save and saved_at != state.iteration:
            save(log)
        saved_in_background(log, blocking=True)
        if splits.test is not None and evaluates:
            result = evaluation("test", splits.test)
            log.evaluation(result)
            if state.history:
                state.history[-1].test_lm_loss = result["test_lm_loss"]
        if ckpt.save:
            log.print(f" metrics: {log.metrics_path}")
            log.print(f" checkpoint: {run_directory.checkpoint_dir(ckpt.save, state.iteration)}")
        if logging.tensorboard_dir:
            log.print(f" tensorboard: {logging.tensorboard_dir}")
    finally:
        if async_saves is not None:
            # after an error another rank may be gone: no collective here; an unfinished save
            # stays a .partial directory, as after a crash
            async_saves.queue.close(abort=True)
        for hook in hooks:
            hook.remove()
        if profiler:
            profiler.stop()
        if training.manual_gc:
            gc.enable()
        if signals is not None:
            signals.close()
        if log is not None:
            log.close()
    return state


def check_load_path(config: RunConfig) -> bool:
    """Refuse a ``--load`` that holds no checkpoint, unless it is also ``--save`` (a run that
    resumes itself, launched for the first time); return whether the run starts from scratch."""
    ckpt = config.checkpoint
    if not ckpt.load or run_directory.has_checkpoint(ckpt.load):
        return False
    same_as_save = ckpt.save and os.path.realpath(ckpt.save) == os.path.realpath(ckpt.load)
    if same_as_save and not ckpt.finetune and not config.logging.skip_train:
        return True
    missing = "does not exist" if not os.path.exists(ckpt.load) else "holds no checkpoint"
    raise ConfigError(
        f"--load {ckpt.load} {missing} (no {run_directory.LATEST_FILE}, no iter_XXXXXXX); "
        "point it at the --save directory of a run, or drop --load to train from scratch "
        "(with --load equal to --save, a first launch starts from scratch by itself)"
    )


def check_save_path(config: RunConfig) -> None:
    """Refuse a ``--save`` that cannot be written, or that holds an earlier run this launch does
    not resume (training from step 0 would replace its checkpoints and append a second history
    to its metrics.jsonl). Resuming is ``--load`` equal to ``--save``, as in Megatron-LM."""
    ckpt = config.checkpoint
    for flag, directory in (
        ("--save", ckpt.save),
        ("--tensorboard-dir", config.logging.tensorboard_dir),
    ):
        if directory:
            check_writable_directory(flag, directory)
    if not ckpt.save:
        return
    resumes = (
        ckpt.load
        and not ckpt.finetune
        and os.path.realpath(ckpt.load) == os.path.realpath(ckpt.save)
    )
    if resumes:
        return
    if run_directory.has_checkpoint(ckpt.save):
        iterations = run_directory.saved_iterations(ckpt.save)
        latest = run_directory.latest_iteration(ckpt.save)
        held = f"checkpoints up to iteration {max([latest or 0, *iterations])}"
    elif os.path.isfile(run_directory.metrics_path(ckpt.save)):
        held = f"the {run_directory.METRICS_FILE} of an earlier run"
    else:
        return
    instead = "without --finetune " if ckpt.finetune else ""
    raise ConfigError(
        f"--save {ckpt.save} already holds {held}, which this launch would overwrite from "
        f"iteration 0; resume that run with --load {ckpt.save} {instead}(Megatron-LM's --save X "
        f"--load X), give another --save directory, or delete {ckpt.save} to start over"
    )


def check_writable_directory(flag: str, directory: str) -> None:
    """One line when ``directory`` is not a directory this process can create and write in
    (tried with a temporary file in it, or in its nearest existing parent; nothing is left)."""
    existing = os.path.abspath(directory)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        what = (
            "is a file"
            if existing == os.path.abspath(directory)
            else f"is under the file {existing}"
        )
        raise ConfigError(f"{flag} {directory} {what}, not a directory; give a directory")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise ConfigError(
            f"{flag} {directory} cannot be written ({existing}: {error.strerror}); give a "
            "directory this user can write, or fix its permissions"
        ) from None


def data_blends(data) -> list:
    """``(flag, blend)`` for each blend the run reads from disk."""
    if data.mock_data:
        return []
    named = [
        ("--data-path", data.data_path),
        ("--train-data-path", data.train_data_path),
        ("--valid-data-path", data.valid_data_path),
        ("--test-data-path", data.test_data_path),
    ]
    return [(flag, blend) for flag, blend in named if blend]


def describe_tokenizer(data, tokenizer) -> str:
    """'--tokenizer-type T (FILE, N tokens)' for messages."""
    source = data.vocab_file or data.tokenizer_model
    return (
        f"--tokenizer-type {data.tokenizer_type} ({source + ', ' if source else ''}"
        f"{tokenizer.vocab_size} tokens)"
    )


def _report_load(ckpt, restored, regularizer, fresh_run, skip_train=False) -> None:
    """Say before the first step where the run starts from."""
    if fresh_run:
        print(f" note: no checkpoint in {ckpt.load} yet: training from scratch", flush=True)
        return
    for directory, problem in restored["skipped"]:
        print(
            f" WARNING: checkpoint {directory} does not load ({problem}); using the previous one",
            flush=True,
        )
    if skip_train:
        print(
            f" evaluating {restored['directory']} (iteration {restored['iteration']}) without "
            "training (--skip-train)",
            flush=True,
        )
        return
    if ckpt.finetune:
        print(
            f" loaded the weights of {restored['directory']} (iteration "
            f"{restored['iteration']}) for a new run (--finetune)",
            flush=True,
        )
        return
    details = [
        f"iteration {restored['iteration']}",
        f"consumed samples {restored['consumed_samples']:,}",
    ]
    if regularizer is not None:
        details.append(f"l1 coeff {float(regularizer.l1_coeff):.4E}")
    weights_only = " (weights only: --no-load-optim)" if ckpt.no_load_optim else ""
    if restored.get("megatron_lm"):
        weights_only += " (Megatron-LM's layout; its RNG states are not restored)"
    print(f" resuming from {restored['directory']}: {', '.join(details)}{weights_only}", flush=True)


@dataclass
class TrainingObjects:
    """What one rank trains with: its model chunks (in megatron's DDP), optimizer, LR schedule
    and the ReMoE coefficient (None for dense and TopK models)."""

    model_chunks: list
    optimizer: object
    scheduler: OptimizerParamScheduler
    regularizer: Optional[AdaptiveL1]


def build_training_objects(config: RunConfig, *, device: torch.device) -> TrainingObjects:
    """This rank's model, DDP, optimizer and schedule (megatron's parallel groups must be
    initialized; ``config.model.vocab_size`` is the padded vocabulary and
    ``config.training.global_batch_size`` is set), the same on every device."""
    training = config.training
    regularizer = build_regularizer(config.model, device=device)
    built = build_model_for_run(
        config.model,
        config.parallel,
        config.layers,
        cuda_available=device.type == "cuda",
        bf16=training.bf16,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        regularizer=regularizer,
    )
    model = built.model.to(device)
    if training.bf16:
        model = Float16Module(built.transformer_config, model)
    ddp = wrap_with_ddp(
        model,
        built.transformer_config,
        use_distributed_optimizer=training.use_distributed_optimizer,
        overlap_grad_reduce=training.overlap_grad_reduce,
        overlap_param_gather=training.overlap_param_gather,
    )
    optimizer = get_megatron_optimizer(optimizer_config(training), [ddp])
    initialize_adam_state(optimizer)
    return TrainingObjects(
        model_chunks=[ddp],
        optimizer=optimizer,
        scheduler=lr_scheduler(training, optimizer),
        regularizer=regularizer,
    )


def optimizer_config(training: TrainingConfig) -> OptimizerConfig:
    return OptimizerConfig(
        optimizer="adam",
        lr=training.lr,
        min_lr=training.min_lr,
        weight_decay=training.weight_decay,
        adam_beta1=training.adam_beta1,
        adam_beta2=training.adam_beta2,
        adam_eps=training.adam_eps,
        clip_grad=training.clip_grad,
        bf16=training.bf16,
        params_dtype=torch.bfloat16 if training.bf16 else torch.float32,
        use_distributed_optimizer=training.use_distributed_optimizer,
        overlap_param_gather=training.overlap_param_gather,
    )


def collect_garbage(
    training: TrainingConfig, *, iteration: Optional[int] = None, evaluation: bool = False
) -> bool:
    """--manual-gc's collection points: every --manual-gc-interval steps, and before and after
    each evaluation (unless --no-manual-gc-eval). Whether it collected."""
    due = training.manual_gc and (
        training.manual_gc_eval
        if evaluation
        else bool(training.manual_gc_interval) and iteration % training.manual_gc_interval == 0
    )
    if due:
        gc.collect()
    return due


def lr_scheduler(training: TrainingConfig, optimizer) -> OptimizerParamScheduler:
    """Megatron-LM's schedule, counted in samples: warm-up, then decay to --min-lr."""
    decay_iters = training.lr_decay_iters or training.train_iters
    if decay_iters == 0:  # --train-iters 0: nothing will be trained
        decay_iters = 1
    batch = training.global_batch_size

    def samples(iterations):  # consumed by then: the ramp-up's smaller batches count as such
        return samples_after(iterations, batch, training.rampup_batch_size)

    decay_samples = samples(decay_iters)
    if training.lr_warmup_fraction is not None:
        warmup_samples = int(training.lr_warmup_fraction * decay_samples)
    else:
        warmup_samples = samples(training.lr_warmup_iters)
    if warmup_samples >= decay_samples:
        warmup_iters = (
            training.lr_warmup_iters
            if training.lr_warmup_fraction is None
            else warmup_samples // batch
        )
        raise ConfigError(
            f"the LR warm-up ({warmup_iters} iterations) must end "
            f"before the decay does ({decay_iters} iterations); shorten --lr-warmup-iters/"
            "--lr-warmup-fraction or lengthen --train-iters/--lr-decay-iters"
        )
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=training.lr,
        min_lr=training.min_lr,
        lr_warmup_steps=warmup_samples,
        lr_decay_steps=decay_samples,
        lr_decay_style=training.lr_decay_style,
        wsd_decay_steps=(
            None
            if training.lr_wsd_decay_iters is None
            else decay_samples - samples(decay_iters - training.lr_wsd_decay_iters)
        ),
        lr_wsd_decay_style=training.lr_wsd_decay_style,
        start_wd=training.weight_decay,
        end_wd=training.weight_decay,
        wd_incr_steps=samples(training.train_iters),
        wd_incr_style="constant",
    )


def num_samples(config: RunConfig) -> tuple[int, Optional[int], Optional[int]]:
    """Samples each split must provide (None: the whole split, each sample once). Every
    evaluation reads the same first ``--eval-iters`` global batches of its split, or all of it
    with ``--full-validation``, so validation losses compare across iterations (and, the split's
    order not following ``--seed``, across seeds). ``--skip-train`` builds no training split."""
    training = config.training
    batch = training.global_batch_size
    train = (
        0
        if config.logging.skip_train
        else samples_after(training.train_iters, batch, training.rampup_batch_size)
    )
    if config.logging.full_validation:
        return train, None, None
    per_evaluation = max(config.logging.eval_iters, 1) * batch
    return train, per_evaluation, per_evaluation


def _count_skips(state: RunState, record: StepRecord, max_skipped_steps: int) -> None:
    if not record.skipped:
        state.skipped_in_a_row = 0
        return
    state.skipped_iterations += 1
    state.skipped_in_a_row += 1
    if state.skipped_in_a_row > max_skipped_steps:
        raise TrainingStopped(
            f"{state.skipped_in_a_row} steps in a row had a non-finite loss or gradient "
            f"(iteration {state.iteration}); lower --lr or check the data, or raise "
            "--max-skipped-steps"
        )


@torch.no_grad()
def evaluate(
    model_chunks,
    batches,
    num_microbatches: int,
    samples_per_step: list,
    device: torch.device,
    *,
    global_batch_size: int,
    seq_length: int,
    micro_batch_size: int,
    domain_names: Sequence[str] = (),
) -> tuple[float, dict]:
    """Token-mean LM loss over global batches of which the i-th scores ``samples_per_step[i]``
    samples (a last one filled up with masked samples: ``gpt_datasets.evaluation_batches``), and,
    for batches with ``domains_BSD``, the token-mean loss of each of ``domain_names`` that has
    scored tokens."""
    sync_params(model_chunks)  # the weights of the last step, on every rank
    for chunk in model_chunks:
        chunk.eval()
    total, count = 0.0, 0.0
    per_domain_2D = torch.zeros(2, len(domain_names), dtype=torch.float64)
    for samples in samples_per_step:
        step_batches = [next(batches) for _ in range(num_microbatches)]
        loss = forward_backward(
            model_chunks,
            step_batches,
            forward_only=True,
            num_microbatches=num_microbatches,
            seq_length=seq_length,
            micro_batch_size=micro_batch_size,
        )
        weight = samples / global_batch_size  # every sample has seq_length scored tokens
        total += float(loss["lm_loss"]) * weight
        count += weight
        if "lm_loss_per_domain_2D" in loss:
            per_domain_2D += loss["lm_loss_per_domain_2D"].double().cpu()
    for chunk in model_chunks:
        chunk.train()
    losses = torch.cat(
        [
            torch.tensor([total / count if count else float("nan")]),
            per_domain_2D.reshape(-1).float(),
        ]
    )
    # only the last stage computed them; everyone reports the same values
    group = parallel_state.get_pipeline_model_parallel_group()
    if dist.get_world_size(group) > 1:
        last = parallel_state.get_pipeline_model_parallel_last_rank()
        losses = losses.to(device)
        dist.broadcast(losses, src=last, group=group)
    summed_D, tokens_D = losses[1:].cpu().double().reshape(2, -1)
    per_domain = {
        name: float(summed_D[d] / tokens_D[d])
        for d, name in enumerate(domain_names)
        if tokens_D[d] > 0
    }
    return float(losses[0]), per_domain


# A launch's steps that print a console line before their --log-interval window ends.
EARLY_LINES = (1, 2, 5, 10)


def log_window(
    log,
    window: list,
    config: RunConfig,
    state: RunState,
    world_size: int,
    health: Optional[RoutingHealth] = None,
    console_only: bool = False,
    *,
    routing_load: Optional[ExpertLoad] = None,
    timers=None,
    device: Optional[torch.device] = None,
) -> None:
    """Average the window's step records into one, with the window's expert shares, timers and
    memory; report changes of the routing's health. Every rank calls it (the window's counts,
    timers and memory are reduced over ranks). ``console_only``: the line alone (no record
    written, nothing reduced, no health update)."""
    records = [r for r in window if not r.skipped] or window
    last = window[-1]
    seconds = sum(r.step_seconds for r in window) / len(window)
    model_config, training = config.model, config.training
    # each step's own batch (--rampup-batch-size): tokens/s and FLOP/s over the window's steps
    batch_sizes = [r.global_batch_size or training.global_batch_size for r in window]
    tokens_per_step = _mean(batch_sizes) * model_config.seq_length
    out = dict(
        iteration=state.iteration,
        train_iters=training.train_iters,
        consumed_samples=state.consumed_samples,
        ms_per_iteration=1000 * seconds,
        tokens_per_sec=tokens_per_step / seconds,
        lr=float(last.lr),
        global_batch_size=batch_sizes[-1],
        lm_loss=_mean(float(r.lm_loss) for r in records),
        grad_norm=_mean(r.grad_norm for r in records),
        skipped_iterations=state.skipped_iterations,
    )
    collapsed = set()
    if model_config.kind.adaptive_l1:
        sparsity_L = torch.stack([r.routing.sparsity_L for r in records]).mean(0)
        moe_layers = ~torch.isnan(sparsity_L)
        reg_loss_L = torch.stack([r.routing.reg_loss_L for r in records]).mean(0)
        out.update(
            reg_loss=_mean(float(r.routing.reg_loss_L[moe_layers].mean()) for r in records),
            l1_coeff=float(last.routing.l1_coeff),
            sparsity=_mean(float(r.routing.sparsity) for r in records),
            sparsity_min=float(sparsity_L[moe_layers].min()),
            sparsity_max=float(sparsity_L[moe_layers].max()),
            sparsity_per_layer=[float(v) for v in sparsity_L[moe_layers]],
            reg_loss_per_layer=[float(v) for v in reg_loss_L[moe_layers]],
        )
        active = (1.0 - out["sparsity"]) * model_config.total_experts
        collapsed = collapsed_layers(sparsity_L)
        out["collapsed_layers"] = len(collapsed)
    else:
        active = model_config.nominal_active_experts
        for name in last.aux_losses_L:
            out[name] = _mean(
                float(r.aux_losses_L[name].sum() / model_config.num_layers) for r in records
            )
            # the MoE layers' values (the other rows are zero)
            losses_L = torch.stack([r.aux_losses_L[name] for r in records]).mean(0)
            out[f"{name}_per_layer"] = [float(v) for v in losses_L[losses_L != 0]]
    if routing_load is not None and not console_only:
        out.update(
            _routing_shares(routing_load.window(), log, state, health, collapsed, len(records))
        )
    if not console_only:
        device = device or torch.device("cpu")
        if timers is not None:
            out["timers_ms"], timer_lines = timers.window(len(window), device)
        out.update(memory_record(device))
    flops = training_flops_per_token(model_config, active) * tokens_per_step
    out["tflops_per_gpu"] = flops / seconds / world_size / 1e12
    if console_only:
        log.print(format_step_line(out))
    else:
        log.step(out)
        if timers is not None and timer_lines:
            log.print(timer_lines)


def _routing_shares(
    shares, log, state: RunState, health: Optional[RoutingHealth], collapsed: set, steps: int
) -> dict:
    """The window's expert shares: per MoE layer, and the model's summary; dead experts (the
    health report hears of changes; every window's state goes to metrics.jsonl)."""
    per_layer = shares.per_layer()
    layers = shares.moe_layers
    if not layers:  # nothing routed in the window (Lory's dense warm-up)
        return {}
    dead = dead_experts(shares.share_LE)
    if health is not None:
        for line in health.update(state.iteration, dead, collapsed, steps):
            log.print(line)
    out = dict(
        moe_layers=layers,
        expert_share_min=min(per_layer["expert_share_min"]),
        expert_share_max=max(per_layer["expert_share_max"]),
        expert_share_cv=_mean(per_layer["expert_share_cv"]),
        experts_per_token=_mean(per_layer["experts_per_token"]),
        tokens_without_expert=_mean(per_layer["tokens_without_expert"]),
        dead_experts=len(dead),
        dead_experts_per_layer=[
            sorted(e for dead_layer, e in dead if dead_layer == layer) for layer in layers
        ],
    )
    out.update({f"{key}_per_layer": values for key, values in per_layer.items()})
    return out


def _exit_reason(training: TrainingConfig, state, run_started, signals, device) -> Optional[str]:
    """Why the run stops after this step (every rank gets the same answer), or None."""
    if signals is not None:
        received = signals.received(device)
        if received:
            return f"received {received} (--exit-signal-handler)"
    if training.exit_interval and state.iteration % training.exit_interval == 0:
        return f"--exit-interval {training.exit_interval}"
    if training.exit_duration_in_mins:
        over = time.time() - run_started > 60 * training.exit_duration_in_mins
        over = torch.tensor(float(over), device=device)
        dist.all_reduce(over, op=dist.ReduceOp.MAX)  # every rank stops at the same step
        if over.item():
            return f"--exit-duration-in-mins {training.exit_duration_in_mins}"
    return None


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def _save(
    config: RunConfig,
    state,
    model_chunks,
    optimizer,
    scheduler,
    regularizer,
    dp_size,
    log=None,
    async_saves=None,
) -> None:
    started = time.perf_counter()
    ckpt = config.checkpoint
    directory = checkpointing.save_checkpoint(
        ckpt.save,
        state.iteration,
        model_chunks,
        None if ckpt.no_save_optim else optimizer,
        scheduler,
        consumed_samples=state.consumed_samples,
        regularizer=regularizer,
        run_config=config.to_dict(),
        data_parallel_size=dp_size,
        fully_parallel=ckpt.ckpt_fully_parallel_save,
        fully_reshardable=ckpt.dist_ckpt_optim_fully_reshardable,
        async_saves=async_saves,
    )
    if log is not None:
        seconds = time.perf_counter() - started
        log.print(
            f" checkpoint {directory} is being written in the background (training was "
            f"held {seconds:.1f} s)"
            if async_saves
            else f" saved checkpoint {directory} ({seconds:.1f} s)"
        )
