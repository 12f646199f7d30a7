"""Checkpoints are atomic: a write that dies midway leaves the previous one and the pointer."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from remoe_patches.train import checkpointing
from remoe_patches.runs import run_directory
from remoe_patches.config.model_config import ModelConfig
from remoe_patches.model.build import build_model
from remoe_patches.config.router_registry import ReLUOptions
from remoe_patches.train.training_step import forward_backward, wrap_with_ddp

from tiny import TINY_RELU_MODEL


def make_run(single_rank):
    built = build_model(ModelConfig(**TINY_RELU_MODEL), single_rank)
    ddp = wrap_with_ddp(built.model, built.transformer_config)
    optimizer = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-3), [ddp])
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=1e-3,
        min_lr=1e-4,
        lr_warmup_steps=1,
        lr_decay_steps=10,
        lr_decay_style="cosine",
        start_wd=0.0,
        end_wd=0.0,
        wd_incr_steps=10,
        wd_incr_style="constant",
    )
    # one step, so that the optimizer has its Adam moments to save
    tokens = torch.randint(0, TINY_RELU_MODEL["vocab_size"], (2, TINY_RELU_MODEL["seq_length"] + 1))
    batch = dict(
        tokens_BS=tokens[:, :-1],
        labels_BS=tokens[:, 1:],
        loss_mask_BS=torch.ones(2, TINY_RELU_MODEL["seq_length"]),
        position_ids_BS=torch.arange(TINY_RELU_MODEL["seq_length"]).expand(2, -1),
    )
    forward_backward(
        [ddp],
        [batch],
        num_microbatches=1,
        seq_length=TINY_RELU_MODEL["seq_length"],
        micro_batch_size=2,
    )
    optimizer.step()
    return built, ddp, optimizer, scheduler


def weights(module):
    return {k: v.clone() for k, v in module.state_dict().items() if torch.is_tensor(v)}


class Crash(RuntimeError):
    pass


def test_crash_mid_write_keeps_previous_checkpoint(single_rank, tmp_path, monkeypatch):
    built, ddp, optimizer, scheduler = make_run(single_rank)
    built.regularizer.l1_coeff = torch.tensor(0.25)
    checkpointing.save_checkpoint(
        str(tmp_path),
        1,
        [ddp],
        optimizer,
        scheduler,
        consumed_samples=4,
        regularizer=built.regularizer,
    )
    saved = weights(built.model)

    with torch.no_grad():
        for p in built.model.parameters():
            p.add_(1.0)
    real_save = checkpointing.dist_checkpointing.save

    def dies_midway(state, directory, **kwargs):
        real_save(state, directory, **kwargs)  # the shards are on disk...
        raise Crash("killed while finishing the checkpoint")  # ...but the write never completes

    monkeypatch.setattr(checkpointing.dist_checkpointing, "save", dies_midway)
    with pytest.raises(Crash):
        checkpointing.save_checkpoint(
            str(tmp_path),
            2,
            [ddp],
            optimizer,
            scheduler,
            consumed_samples=8,
            regularizer=built.regularizer,
        )
    monkeypatch.setattr(checkpointing.dist_checkpointing, "save", real_save)

    assert run_directory.latest_iteration(str(tmp_path)) == 1
    assert not (tmp_path / "iter_0000002").exists()
    assert (tmp_path / "iter_0000002.partial").exists()

    fresh, fresh_ddp, fresh_optimizer, fresh_scheduler = make_run(single_rank)
    restored = checkpointing.load_checkpoint(
        str(tmp_path), [fresh_ddp], fresh_optimizer, fresh_scheduler, regularizer=fresh.regularizer
    )
    assert restored["iteration"] == 1 and restored["consumed_samples"] == 4
    assert fresh.regularizer.l1_coeff.item() == 0.25
    for key, value in weights(fresh.model).items():
        torch.testing.assert_close(value, saved[key], rtol=0, atol=0, msg=key)

    # the next save replaces the stale partial directory and moves the pointer
    checkpointing.save_checkpoint(
        str(tmp_path), 2, [fresh_ddp], fresh_optimizer, fresh_scheduler, consumed_samples=8
    )
    assert run_directory.latest_iteration(str(tmp_path)) == 2
    assert sorted(os.listdir(tmp_path)) == [
        "iter_0000001",
        "iter_0000002",
        run_directory.LATEST_FILE,
    ]


def test_fresh_directory_is_a_fresh_start(single_rank, tmp_path):
    _, ddp, optimizer, scheduler = make_run(single_rank)
    assert checkpointing.load_checkpoint(str(tmp_path), [ddp], optimizer, scheduler) is None


def test_pointer_to_missing_checkpoint_is_a_clear_error(single_rank, tmp_path):
    _, ddp, optimizer, scheduler = make_run(single_rank)
    (tmp_path / run_directory.LATEST_FILE).write_text("7")
    with pytest.raises(
        checkpointing.CheckpointError, match="iter_0000007: the directory is missing"
    ):
        checkpointing.load_checkpoint(str(tmp_path), [ddp], optimizer, scheduler)


def test_weights_only_load_refreshes_the_fp32_main_weights(single_rank, tmp_path):
    from tiny_training import distributed_bf16_run, saved_after_training

    saved_after_training(single_rank, tmp_path)
    _, fresh_ddp, fresh = distributed_bf16_run(single_rank, seed=5)
    checkpointing.load_checkpoint(str(tmp_path), [fresh_ddp], fresh, None, load_optimizer=False)
    # The optimizer updates its fp32 copies and writes them into the bf16 model: they must be
    # the loaded weights, or the first step would overwrite them with updated initial weights.
    for name, param in fresh_ddp.module.named_parameters():
        assert torch.equal(param.main_param, param.detach().view(-1).float()), name


def test_optimizer_state_of_another_layout_is_refused_in_one_line(single_rank, tmp_path):
    from tiny_training import saved_after_training

    built, ddp, optimizer = saved_after_training(single_rank, tmp_path / "dist", steps=1)
    _, plain_ddp, plain, _ = make_run(single_rank)  # no distributed optimizer
    with pytest.raises(ValueError, match="saved with --use-distributed-optimizer.*--no-load-optim"):
        checkpointing.load_checkpoint(str(tmp_path / "dist"), [plain_ddp], plain, None)
    # the weights alone load
    checkpointing.load_checkpoint(
        str(tmp_path / "dist"), [plain_ddp], plain, None, load_optimizer=False
    )

    checkpointing.save_checkpoint(
        str(tmp_path / "tp2"),
        1,
        [ddp],
        optimizer,
        None,
        consumed_samples=2,
        regularizer=built.regularizer,
        run_config={"parallel": {"tensor_model_parallel_size": 2}},
    )
    with pytest.raises(
        ValueError,
        match=r"TP/PP/EP \(2, 1, 1\).*\(1, 1, 1\).*"
        "--dist-ckpt-optim-fully-reshardable.*--no-load-optim",
    ):
        checkpointing.load_checkpoint(str(tmp_path / "tp2"), [ddp], optimizer, None)
    # saved by parameter, the state loads under any layout (tests/train/test_training.py trains it)
    checkpointing.save_checkpoint(
        str(tmp_path / "any"),
        1,
        [ddp],
        optimizer,
        None,
        consumed_samples=2,
        regularizer=built.regularizer,
        run_config={"parallel": {"tensor_model_parallel_size": 2}},
        fully_reshardable=True,
    )
    checkpointing.load_checkpoint(str(tmp_path / "any"), [ddp], optimizer, None)


def test_an_async_save_holds_its_steps_state_and_is_latest_once_put_into_place(
    single_rank, tmp_path
):
    """--async-save: the checkpoint has the weights of the step it was scheduled at although
    training goes on, and becomes the latest only when ``finalize`` puts it into place."""
    built, ddp, optimizer, scheduler = make_run(single_rank)
    root = str(tmp_path)
    checkpointing.save_checkpoint(
        root, 1, [ddp], optimizer, scheduler, consumed_samples=4, regularizer=built.regularizer
    )
    saves = checkpointing.AsyncSaves(persistent=True)
    try:
        scheduled = weights(built.model)
        final = checkpointing.save_checkpoint(
            root,
            2,
            [ddp],
            optimizer,
            scheduler,
            consumed_samples=8,
            regularizer=built.regularizer,
            async_saves=saves,
        )
        with torch.no_grad():  # training goes on
            for param in built.model.parameters():
                param.add_(1.0)
        assert run_directory.latest_iteration(root) == 1  # not before it is put into place
        assert os.path.isdir(final + run_directory.PARTIAL_SUFFIX)
        assert saves.finalize(blocking=True) == [final]
        assert run_directory.latest_iteration(root) == 2 and os.path.isdir(final)
        assert not os.path.exists(final + run_directory.PARTIAL_SUFFIX)
    finally:
        saves.close()
    restored = checkpointing.load_checkpoint(root, [ddp], optimizer, scheduler)
    assert restored["iteration"] == 2 and restored["consumed_samples"] == 8
    for name, value in weights(built.model).items():
        assert torch.equal(value, scheduled[name]), name


def test_an_async_save_killed_mid_write_loses_nothing_complete(single_rank, tmp_path):
    """The writer dies before its checkpoint is put into place (the job is killed): the previous
    checkpoint is the latest and loads; the next save clears the partial one."""
    built, ddp, optimizer, scheduler = make_run(single_rank)
    root = str(tmp_path)
    checkpointing.save_checkpoint(
        root, 1, [ddp], optimizer, scheduler, consumed_samples=4, regularizer=built.regularizer
    )
    first = weights(built.model)
    saves = checkpointing.AsyncSaves(persistent=True)
    with torch.no_grad():
        for param in built.model.parameters():
            param.add_(1.0)
    partial = (
        checkpointing.save_checkpoint(
            root,
            2,
            [ddp],
            optimizer,
            scheduler,
            consumed_samples=8,
            regularizer=built.regularizer,
            async_saves=saves,
        )
        + run_directory.PARTIAL_SUFFIX
    )
    saves.queue.close(abort=True)  # the writer process is killed
    assert run_directory.latest_iteration(root) == 1 and os.path.isdir(partial)
    restored = checkpointing.load_checkpoint(root, [ddp], optimizer, scheduler)
    assert restored["iteration"] == 1
    for name, value in weights(built.model).items():
        assert torch.equal(value, first[name]), name
    checkpointing.save_checkpoint(
        root, 2, [ddp], optimizer, scheduler, consumed_samples=8, regularizer=built.regularizer
    )
    assert not os.path.exists(partial) and run_directory.latest_iteration(root) == 2


TE_MOE_NORM = "decoder.layers.pre_mlp_layernorm.weight"  # megatron's TE spec: a separate TENorm
LOCAL_MOE_NORM = "decoder.layers.mlp.linear_fc1.layer_norm_weight"  # its local spec's mapped name


def named_as_transformer_engine(ddp, monkeypatch):
    """The model's sharded state as megatron's TE spec names it (no TE on CPU to build one)."""
    module = checkpointing._unwrap(ddp)
    real = module.sharded_state_dict

    def renamed(*args, **kwargs):
        state = real(*args, **kwargs)
        for item in state.values():
            if getattr(item, "key", None) == LOCAL_MOE_NORM:
                item.key = TE_MOE_NORM
        return state

    monkeypatch.setattr(module, "sharded_state_dict", renamed)


def adam_moments(optimizer):
    return [state["exp_avg"].clone() for state in optimizer.optimizer.state.values()]


@pytest.mark.parametrize("saved_as", ["transformer_engine", "local"])
def test_checkpoint_of_the_other_layer_implementation_loads(
    single_rank, tmp_path, monkeypatch, saved_as
):
    built, ddp, optimizer, scheduler = make_run(single_rank)
    if saved_as == "transformer_engine":
        named_as_transformer_engine(ddp, monkeypatch)
    checkpointing.save_checkpoint(
        str(tmp_path),
        1,
        [ddp],
        optimizer,
        scheduler,
        consumed_samples=2,
        regularizer=built.regularizer,
    )
    keys = set(
        checkpointing.dist_checkpointing.load_tensors_metadata(str(tmp_path / "iter_0000001"))
    )
    assert (TE_MOE_NORM in keys) == (saved_as == "transformer_engine")
    assert (LOCAL_MOE_NORM in keys) == (saved_as == "local")

    fresh, fresh_ddp, fresh_optimizer, fresh_scheduler = make_run(single_rank)
    if saved_as == "local":
        named_as_transformer_engine(fresh_ddp, monkeypatch)
    with torch.no_grad():  # the norms would load as ones by chance otherwise
        for name, param in fresh.model.named_parameters():
            param.add_(0.5)
    checkpointing.load_checkpoint(
        str(tmp_path), [fresh_ddp], fresh_optimizer, fresh_scheduler, regularizer=fresh.regularizer
    )
    expected = weights(built.model)
    for key, value in weights(fresh.model).items():
        assert torch.equal(value, expected[key]), key
    for got, saved in zip(adam_moments(fresh_optimizer), adam_moments(optimizer)):
        assert torch.equal(got, saved)


def test_checkpoint_of_another_architecture_is_refused_naming_the_flags(single_rank, tmp_path):
    built, ddp, optimizer, scheduler = make_run(single_rank)
    saved = ModelConfig(**{**TINY_RELU_MODEL, "hidden_size": 64, "num_experts": 4})
    checkpointing.save_checkpoint(
        str(tmp_path),
        1,
        [ddp],
        optimizer,
        scheduler,
        consumed_samples=2,
        regularizer=built.regularizer,
        run_config={"model": dataclasses.asdict(saved)},
    )
    with pytest.raises(checkpointing.CheckpointError) as error:
        checkpointing.load_checkpoint(
            str(tmp_path), [ddp], optimizer, scheduler, model_config=ModelConfig(**TINY_RELU_MODEL)
        )
    message = str(error.value)
    assert "\n" not in message
    assert "--hidden-size: checkpoint 64, this run 32" in message
    assert "--num-experts x --moe-granularity: checkpoint 4, this run 8" in message
    assert "--num-layers" not in message
    # the same architecture with other routing settings loads
    same_shapes = ModelConfig(
        **{**TINY_RELU_MODEL, "topk": 2, "router_options": ReLUOptions(l1_coeff_init=1e-4)}
    )
    checkpointing.save_checkpoint(
        str(tmp_path / "same"),
        1,
        [ddp],
        optimizer,
        scheduler,
        consumed_samples=2,
        regularizer=built.regularizer,
        run_config={"model": dataclasses.asdict(same_shapes)},
    )
    checkpointing.load_checkpoint(
        str(tmp_path / "same"),
        [ddp],
        optimizer,
        scheduler,
        model_config=ModelConfig(**TINY_RELU_MODEL),
    )
