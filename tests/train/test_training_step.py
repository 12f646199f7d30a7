"""training_step: the loss function, the forward step, DDP wrapping and one step's forward and
backward through megatron's schedules, checked against the model called directly.

The reported LM loss is the token mean over all of a step's micro-batches (and data-parallel
ranks), whatever the masks; gradients land in ``param.main_grad`` as autograd gives them for
megatron's per-micro-batch loss; lazily gathered weights are stale until ``sync_params``.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

from multiproc import run_on_ranks
from remoe_patches.config.model_config import ModelConfig, ParallelConfig
from remoe_patches.model.build import build_model
from remoe_patches.runtime.parallel import destroy_parallel, initialize_parallel
from remoe_patches.train.training_step import (
    forward_backward,
    gpt_forward_step,
    lm_loss_func,
    params_gathered_lazily,
    sync_params,
    wrap_with_ddp,
)

from tiny import TINY_MODEL
from tiny_training import SEQ, make_batch, step_kwargs, training_objects


def token_losses(model, batch):
    return model(batch["tokens_BS"], batch["position_ids_BS"], None, labels=batch["labels_BS"])


def masked_sum_and_count(model, batches):
    """Summed masked token losses and their count, from the model called directly."""
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            losses = token_losses(model, batch).float()
            keep = batch["loss_mask_BS"].bool()
            total += losses[keep].sum().item()
            count += int(keep.sum())
    return total, count


def build(parallel, router="dense", seed=0, **ddp_kwargs):
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    built = build_model(ModelConfig(router=router, **TINY_MODEL), parallel)
    return built, wrap_with_ddp(built.model, built.transformer_config, **ddp_kwargs)


def main_grads(model):
    return {name: p.main_grad.clone() for name, p in model.named_parameters()}


# --- lm_loss_func, gpt_forward_step -------------------------------------------------------------


def test_lm_loss_func_is_the_masked_sum_with_its_token_count():
    """Megatron's 3-tuple: sum of the kept token losses (with their gradient), the kept count as
    an int, and [sum, count] detached for reporting."""
    gen = torch.Generator().manual_seed(0)
    losses = torch.rand(3, 5, generator=gen, requires_grad=True)
    mask = (torch.rand(3, 5, generator=gen) > 0.4).float()
    keep = mask.bool()
    loss, num_tokens, report = lm_loss_func(mask, losses)
    torch.testing.assert_close(loss, losses[keep].sum())
    assert num_tokens.dtype == torch.int and int(num_tokens) == int(keep.sum()) != 15
    assert list(report) == ["lm loss"] and not report["lm loss"].requires_grad
    torch.testing.assert_close(
        report["lm loss"], torch.stack([losses[keep].sum(), keep.sum().float()]).detach()
    )
    loss.backward()
    assert torch.equal(losses.grad, mask)  # masked positions get no gradient


def test_lm_loss_func_reports_each_domains_summed_loss_and_count():
    """With ``domains_BSD`` the report adds [sums, counts] per domain: the masked losses of each
    domain's positions; positions of no domain (padding) and masked ones count nowhere."""
    gen = torch.Generator().manual_seed(1)
    losses = torch.rand(2, 6, generator=gen)
    mask = torch.tensor([[1, 1, 1, 0, 1, 1], [1, 1, 1, 1, 1, 0]], dtype=torch.float)
    domain_BS = torch.tensor([[0, 0, 2, 2, -1, 1], [1, 1, 0, 2, 2, 2]])
    domains_BSD = torch.nn.functional.one_hot(domain_BS.clamp(min=0), 3).float()
    domains_BSD[domain_BS < 0] = 0.0
    _, _, report = lm_loss_func(mask, losses, domains_BSD=domains_BSD)
    for d in range(3):
        kept = (domain_BS == d) & mask.bool()
        torch.testing.assert_close(
            report["lm loss per domain"][:, d],
            torch.stack([losses[kept].sum(), kept.sum().float()]),
        )
    assert report["lm loss per domain"][1].sum() == 9  # 10 kept positions, one of no domain


def test_lm_loss_func_sums_low_precision_losses_in_fp32():
    losses = torch.full((4, 256), 1.0 + 2**-7, dtype=torch.bfloat16)  # exact in bf16
    loss, _, report = lm_loss_func(torch.ones(4, 256), losses)
    assert loss.dtype == torch.float32
    assert loss.item() == 1024 * (1.0 + 2**-7)  # a bf16 sum would round it
    assert report["lm loss"].tolist() == [loss.item(), 1024.0]


class RecordingModel:
    def __init__(self):
        self.calls = []

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return torch.rand(args[0].shape)


def test_forward_step_feeds_one_batch_to_the_model_and_masks_with_its_loss_mask():
    """tokens, position ids, no attention mask, labels as keyword; one batch per call."""
    batches = [make_batch(1, kept=[3, 16]), make_batch(2)]
    iterator = iter(batches)
    model = RecordingModel()
    output, loss_fn = gpt_forward_step(iterator, model)
    ((args, kwargs),) = model.calls
    assert args[0] is batches[0]["tokens_BS"] and args[1] is batches[0]["position_ids_BS"]
    assert args[2] is None and kwargs == {"labels": batches[0]["labels_BS"]}
    loss, num_tokens, _ = loss_fn(output)
    assert int(num_tokens) == 3 + 16
    torch.testing.assert_close(loss, output[0, :3].sum() + output[1].sum())
    assert next(iterator) is batches[1]  # the next batch is left for the next micro-batch


# --- wrap_with_ddp, params_gathered_lazily, sync_params ------------------------------------------


def test_ddp_accumulates_fp32_main_grads_and_finalizes_them(single_rank):
    """Gradients go to fp32 ``main_grad`` buffers, bf16 model or not; the schedules' hooks."""
    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(0)
    built = build_model(ModelConfig(router="relu", **TINY_MODEL), single_rank, bf16=True)
    ddp = wrap_with_ddp(built.model, built.transformer_config)
    assert isinstance(ddp, DistributedDataParallel) and ddp.module is built.model
    for name, param in built.model.named_parameters():
        assert param.dtype == torch.bfloat16
        assert param.main_grad.dtype == torch.float32 and param.main_grad.shape == param.shape
    config = built.transformer_config
    assert config.finalize_model_grads_func is finalize_model_grads
    assert config.no_sync_func is None and config.grad_sync_func is None


def test_overlapped_grad_reduce_gives_the_same_gradients(single_rank):
    """With --overlap-grad-reduce the schedules get DDP's no_sync and start_grad_sync; the
    gradients of a two-micro-batch step are those of the plain DDP."""
    batches = [make_batch(3), make_batch(4)]
    plain_built, plain = build(single_rank)
    built, overlapped = build(single_rank, overlap_grad_reduce=True)
    config = built.transformer_config
    assert config.no_sync_func == overlapped.no_sync
    assert config.grad_sync_func == overlapped.start_grad_sync
    for ddp in (plain, overlapped):
        forward_backward([ddp], batches, num_microbatches=2, seq_length=SEQ, micro_batch_size=2)
    expected = main_grads(plain_built.model)
    for name, grad in main_grads(built.model).items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grad, expected[name], msg=name)


@pytest.mark.parametrize(
    "distributed, overlap, lazy",
    [(False, False, False), (True, False, False), (False, True, False), (True, True, True)],
)
def test_params_gathered_lazily_only_with_the_distributed_optimizer_and_overlap(
    distributed, overlap, lazy
):
    chunk = SimpleNamespace(
        ddp_config=SimpleNamespace(
            use_distributed_optimizer=distributed, overlap_param_gather=overlap
        )
    )
    assert params_gathered_lazily([chunk]) is lazy


class RecordingChunk:
    def __init__(self, distributed, overlap):
        self.ddp_config = SimpleNamespace(
            use_distributed_optimizer=distributed, overlap_param_gather=overlap
        )
        self.syncs = []

    def start_param_sync(self, *args, **kwargs):
        self.syncs.append((args, kwargs))


def test_sync_params_forces_the_deferred_gather_on_every_chunk():
    chunks = [RecordingChunk(True, True), RecordingChunk(True, True)]
    sync_params(chunks)
    assert [c.syncs for c in chunks] == [[((), {"force_sync": True})]] * 2
    eager = [RecordingChunk(True, False)]
    sync_params(eager)
    assert eager[0].syncs == []


def test_real_ddp_reports_its_gathering_mode(single_rank):
    _, plain = build(single_rank)
    _, lazy = build(
        single_rank,
        use_distributed_optimizer=True,
        overlap_grad_reduce=True,
        overlap_param_gather=True,
    )
    assert not params_gathered_lazily([plain]) and params_gathered_lazily([lazy])


# --- forward_backward ---------------------------------------------------------------------------


@pytest.mark.parametrize("router", ["dense", "relu"])
def test_reported_loss_is_the_token_mean_over_all_micro_batches(single_rank, router):
    """Micro-batches with 5+16 and 30 kept tokens: the loss is the mean over the 51 tokens (not
    the mean of the two micro-batch means), equal to the model's own losses; ReMoE's regularizer
    is not in it."""
    built, ddp = build(single_rank, router=router)
    batches = [make_batch(5, kept=[5, 16]), make_batch(6, kept=[16, 14])]
    total, count = masked_sum_and_count(built.model, batches)
    assert count == 51
    out = forward_backward([ddp], batches, num_microbatches=2, seq_length=SEQ, micro_batch_size=2)
    assert list(out) == ["lm_loss"]
    torch.testing.assert_close(out["lm_loss"], torch.tensor(total / count), rtol=1e-5, atol=0)
    with torch.no_grad():
        means = [token_losses(built.model, b)[b["loss_mask_BS"].bool()].mean() for b in batches]
    assert abs(out["lm_loss"].item() - sum(means).item() / 2) > 1e-4  # the two differ here


def test_gradients_are_those_of_the_loss_computed_directly(single_rank):
    """main_grad equals autograd's gradient of mean_j(masked token mean of micro-batch j) on a
    copy of the model (equal token counts per micro-batch, different masks)."""
    built, ddp = build(single_rank)
    batches = [make_batch(7, kept=[10, 16]), make_batch(8, kept=[13, 13])]
    forward_backward([ddp], batches, num_microbatches=2, seq_length=SEQ, micro_batch_size=2)
    copy = build_model(ModelConfig(router="dense", **TINY_MODEL), single_rank).model
    copy.load_state_dict(built.model.state_dict())
    loss = 0.0
    for batch in batches:
        keep = batch["loss_mask_BS"].bool()
        loss = loss + token_losses(copy, batch)[keep].mean() / len(batches)
    loss.backward()
    expected = dict(copy.named_parameters())
    for name, grad in main_grads(built.model).items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grad, expected[name].grad, rtol=1e-4, atol=1e-7, msg=name)


def test_each_step_starts_from_zero_gradients_and_forward_only_leaves_them(single_rank):
    built, ddp = build(single_rank, router="relu")
    batches = [make_batch(9)]
    kwargs = dict(num_microbatches=1, seq_length=SEQ, micro_batch_size=2)
    first = forward_backward([ddp], batches, **kwargs)
    grads = main_grads(built.model)
    second = forward_backward([ddp], batches, **kwargs)  # not accumulated onto the first
    for name, grad in main_grads(built.model).items():
        torch.testing.assert_close(grad, grads[name], msg=name)
    evaluated = forward_backward([ddp], [make_batch(10)], forward_only=True, **kwargs)
    for name, grad in main_grads(built.model).items():
        assert torch.equal(grad, grads[name]), name
    assert first["lm_loss"] == second["lm_loss"]
    total, count = masked_sum_and_count(built.model, [make_batch(10)])
    torch.testing.assert_close(evaluated["lm_loss"], torch.tensor(total / count), rtol=1e-5, atol=0)


def two_rank_step(rank, world_size):
    """DP=2: the loss over both ranks' tokens; then a lazily gathered optimizer step."""
    initialize_parallel(ParallelConfig(), rank=rank, world_size=world_size, seed=0)
    try:
        parallel = ParallelConfig()
        kept = [[4, 16], [16, 16]][rank]  # 20 and 32 tokens: unequal counts per rank
        batches = [make_batch(20 + rank, kept=kept)]
        kwargs = dict(num_microbatches=1, seq_length=SEQ, micro_batch_size=2)
        results = {}
        for mode, lazy in (("eager", False), ("lazy", True)):
            built, ddp = build(
                parallel,
                use_distributed_optimizer=True,
                overlap_grad_reduce=lazy,
                overlap_param_gather=lazy,
            )
            optimizer = get_megatron_optimizer(
                OptimizerConfig(optimizer="adam", lr=0.05, use_distributed_optimizer=True), [ddp]
            )
            own = masked_sum_and_count(built.model, batches)
            optimizer.zero_grad()
            loss = forward_backward([ddp], batches, **kwargs)["lm_loss"]
            assert optimizer.step()[0]
            weights = {
                k: v.clone()
                for k, v in built.model.state_dict().items()
                if torch.is_tensor(v) and v.is_floating_point()
            }
            sync_params([ddp])
            synced = {k: v.clone() for k, v in built.model.state_dict().items() if k in weights}
            results[mode] = dict(own=own, loss=loss, stepped=weights, synced=synced)
        results["dp"] = parallel_state.get_data_parallel_world_size()
        return results
    finally:
        destroy_parallel()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return run_on_ranks(two_rank_step, 2, tmp_path_factory.mktemp("dp2"))


@pytest.mark.integration
def test_data_parallel_loss_is_the_token_mean_over_all_ranks(two_ranks):
    """Each rank reports the mean over both ranks' 20 + 32 tokens, not its own mean."""
    assert [r["dp"] for r in two_ranks] == [2, 2]
    for mode in ("eager", "lazy"):
        total = sum(r[mode]["own"][0] for r in two_ranks)
        count = sum(r[mode]["own"][1] for r in two_ranks)
        assert count == 52
        for r in two_ranks:
            assert r[mode]["loss"].item() == pytest.approx(total / count, rel=1e-5)
        own_mean = two_ranks[0][mode]["own"][0] / two_ranks[0][mode]["own"][1]
        assert abs(own_mean - total / count) > 1e-4


@pytest.mark.integration
def test_lazily_gathered_weights_are_stale_until_sync_params(two_ranks):
    """With --overlap-param-gather each rank holds only its own shard's update after the step;
    sync_params gathers the rest: both ranks then hold the eagerly gathered weights."""
    eager = [r["eager"] for r in two_ranks]
    lazy = [r["lazy"] for r in two_ranks]
    names = list(eager[0]["stepped"])
    for name in names:  # the eager optimizer gathers at once: ranks agree right after the step
        torch.testing.assert_close(eager[0]["stepped"][name], eager[1]["stepped"][name])
    stale = [n for n in names if not torch.equal(lazy[0]["stepped"][n], lazy[1]["stepped"][n])]
    assert stale, "before sync_params the ranks should disagree on the shards they do not own"
    for rank in range(2):
        for name in names:
            torch.testing.assert_close(
                lazy[rank]["synced"][name],
                eager[rank]["synced"][name],
                rtol=1e-6,
                atol=1e-7,
                msg=f"rank {rank}: {name}",
            )


# --- train_step ---------------------------------------------------------------------------


def weights(objects):
    return {n: p.detach().clone() for n, p in objects.model_chunks[0].named_parameters()}


@pytest.mark.parametrize("extra", [[], ["--bf16", "--use-distributed-optimizer"]])
def test_train_step_updates_exactly_as_the_optimizers_own_step(single_rank, extra):
    """train_step takes the optimizer's step in parts (to skip a non-finite one after the norm);
    the weights, the norm and the LR come out as megatron's ``optimizer.step()`` gives them,
    with clipping active (the norm is far above --clip-grad)."""
    from remoe_patches.train.training_step import train_step

    batches = [make_batch(1), make_batch(2)]
    config, ours = training_objects("relu", *extra)
    _, theirs = training_objects("relu", *extra)
    assert all(torch.equal(a, b) for a, b in zip(weights(ours).values(), weights(theirs).values()))
    for _ in range(2):
        record = train_step(
            ours.model_chunks,
            ours.optimizer,
            ours.scheduler,
            ours.regularizer,
            batches,
            **step_kwargs(config),
        )
        theirs.optimizer.zero_grad()
        forward_backward(
            theirs.model_chunks, batches, num_microbatches=2, seq_length=SEQ, micro_batch_size=2
        )
        success, grad_norm, _ = theirs.optimizer.step()
        theirs.scheduler.step(increment=config.training.global_batch_size)
        theirs.regularizer.finish_step()
        assert success and not record.skipped
        assert record.grad_norm == grad_norm and grad_norm > 0.05
    for name, value in weights(theirs).items():
        assert torch.equal(weights(ours)[name], value), name
    assert ours.optimizer.param_groups[0]["lr"] == theirs.optimizer.param_groups[0]["lr"]


def test_a_non_finite_loss_skips_the_update_and_keeps_lambda(single_rank):
    from remoe_patches.train.training_step import train_step

    config, objects = training_objects("relu")
    before, coeff = weights(objects), objects.regularizer.l1_coeff.clone()
    scheduler_steps = objects.scheduler.num_steps
    bad = make_batch(1)
    with torch.no_grad():  # an inf weight makes the loss (and every gradient) non-finite
        objects.model_chunks[0].module.output_layer.weight[0, 0] = float("inf")
    before["module.output_layer.weight"][0, 0] = float("inf")
    record = train_step(
        objects.model_chunks,
        objects.optimizer,
        objects.scheduler,
        objects.regularizer,
        [bad, make_batch(2)],
        **step_kwargs(config),
    )
    assert record.skipped
    for name, value in weights(objects).items():
        assert torch.equal(value, before[name]), name
    assert objects.regularizer.l1_coeff.item() == coeff.item()
    assert objects.scheduler.num_steps == scheduler_steps
    assert record.routing is not None  # the step's statistics were consumed all the same
    again = train_step(
        objects.model_chunks,
        objects.optimizer,
        objects.scheduler,
        objects.regularizer,
        [make_batch(3), make_batch(4)],
        **step_kwargs(config),
    )
    assert again.skipped  # the inf weight is still there: skipped again, nothing updated


@pytest.mark.parametrize("router", ["dense", "topk", "relu"])
def test_the_step_record_carries_the_routers_statistics(single_rank, router):
    from remoe_patches.train.training_step import train_step

    config, objects = training_objects(router)
    record = train_step(
        objects.model_chunks,
        objects.optimizer,
        objects.scheduler,
        objects.regularizer,
        [make_batch(1), make_batch(2)],
        **step_kwargs(config),
    )
    assert torch.isfinite(record.lm_loss) and not record.skipped
    if router == "relu":
        stats = record.routing
        assert record.load_balancing_loss_L is None
        assert 0.0 <= stats.sparsity.item() <= 1.0 and stats.l1_coeff.item() == pytest.approx(1e-8)
        torch.testing.assert_close(
            stats.expert_load_LE.sum(-1), (1 - stats.sparsity_L) * 4
        )  # active experts per token
    elif router == "topk":
        assert record.routing is None
        assert record.load_balancing_loss_L.shape == (2,)
        assert (record.load_balancing_loss_L > 0).all()
    else:
        assert record.routing is None and record.load_balancing_loss_L is None
