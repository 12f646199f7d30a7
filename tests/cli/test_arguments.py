"""pretrain_gpt.py's arguments: Megatron-LM launch scripts (the ReMoE authors' included) parse
into the configs they mean, YAML presets and the command line combine, and every mistake is one
clear line naming the flag."""

import dataclasses
from pathlib import Path

import pytest

from remoe_patches.config.run_config import split_blend
from remoe_patches.cli.argument_mapping import (
    model_config_from_args,
    parallel_config_from_args,
    run_config_from_args,
)
from remoe_patches.cli.argument_notes import ineffective_flags
from remoe_patches.cli.arguments import parse_args, parse_run_config
from remoe_patches.config.model_config import ModelConfig, ParallelConfig
from remoe_patches.config.router_registry import SWEEP_NAMES, ReLUOptions

from command_lines import AUTHORS_182M_REMOE, TINY_FLAGS, TINY_MOE_FLAGS, TINY_SIZE_FLAGS

CONFIG_DIR = Path(__file__).resolve().parent.parent.parent / "configs"

TOPK_ONLY_FLAGS = ["--moe-router-pre-softmax", "--moe-aux-loss-coeff"]

# Spec §3: layers, hidden, heads of each preset.
PAPER_SIZES = {"182m": (12, 768, 12), "469m": (24, 1024, 16), "978m": (24, 1536, 16)}
PATHS_ON_COMMAND_LINE = [
    "--data-path",
    "0.6",
    "data/a_text_document",
    "0.4",
    "data/b_text_document",
    "--vocab-file",
    "gpt2-vocab.json",
    "--merge-file",
    "gpt2-merges.txt",
    "--save",
    "runs/x",
]


def without(argv, flag):
    """``argv`` without ``flag`` and, if it takes one, its value."""
    index = argv.index(flag)
    takes_value = index + 1 < len(argv) and not argv[index + 1].startswith("--")
    return argv[:index] + argv[index + 1 + takes_value :]


def parse_error(argv, capsys):
    """The stderr line of a parse that must fail with exit code 2."""
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, f"not one line: {err!r}"
    return err


def flags_of(args, **machine):
    return [flag for flag, _ in ineffective_flags(args, **machine)]


CPU = dict(cuda_available=False, transformer_engine_available=False)
GPU_WITH_TE = dict(cuda_available=True, transformer_engine_available=True)


def transformer_overrides(args, **device) -> dict:
    """The TransformerConfig options the flags give on ``device``, via the run's config."""
    config = run_config_from_args(args)
    return config.layers.transformer_overrides(is_moe=config.model.is_moe, **device)


# --- (a) the authors' launch script --------------------------------------------------------


def test_authors_remoe_script_gives_the_papers_model():
    with pytest.warns(UserWarning, match="--sequence-parallel"):
        args = parse_args(AUTHORS_182M_REMOE)
    expected = ModelConfig(
        num_layers=12,
        hidden_size=768,
        num_attention_heads=12,
        num_query_groups=4,
        ffn_hidden_size=3072,
        seq_length=1024,
        rotary_base=1_000_000,
        init_method_std=0.01,
        router="relu",
        num_experts=8,
        topk=1,
        granularity=1,
        moe_aux_loss_coeff=0.01,
        router_options=ReLUOptions(
            l1_coeff_init=1e-8, l1_coeff_multiplier=1.2, load_balancing=True
        ),
        token_dispatcher="alltoall",
        moe_expert_capacity_factor=None,
        moe_grouped_gemm=True,
        moe_router_dtype=None,  # the model's dtype below 32 experts
        vocab_size=51200,
    )
    model = model_config_from_args(args, vocab_size=51200)
    for field in dataclasses.fields(ModelConfig):
        assert getattr(model, field.name) == getattr(expected, field.name), field.name
    assert parallel_config_from_args(args) == ParallelConfig(
        tensor_model_parallel_size=1,
        pipeline_model_parallel_size=1,
        expert_model_parallel_size=1,
        sequence_parallel=False,
    )
    assert args.tokenizer_type == "GPT2BPETokenizer"
    assert args.split == "969,30,1"
    assert split_blend(args.data_path) == (
        ["../pile/00_text_document", "../pile/01_text_document", "../pile/02_text_document"],
        [0.026, 0.0251, 0.0249],
    )
    schedule = (args.lr, args.min_lr, args.lr_warmup_fraction, args.train_iters)
    assert schedule == (5e-4, 5e-5, 0.01, 60000)
    assert args.add_position_embedding is False and args.add_bias_linear is False


def test_authors_remoe_script_lists_what_has_no_effect():
    with pytest.warns(UserWarning):
        args = parse_args(AUTHORS_182M_REMOE)
    on_cpu = flags_of(args, **CPU)
    for flag in [
        "--use-flash-attn",
        "--sequence-parallel",
        "--no-masked-softmax-fusion",
        *TOPK_ONLY_FLAGS,
    ]:
        assert flag in on_cpu
    # A GPU run's numerics and communication run on CPU too, with gloo and CPU kernels.
    for flag in [
        "--moe-grouped-gemm",
        "--bf16",
        "--use-distributed-optimizer",
        "--overlap-grad-reduce",
        "--overlap-param-gather",
    ]:
        assert flag not in on_cpu
    assert "--moe-router-topk" not in on_cpu  # it sets the target sparsity
    assert len(on_cpu) == len(set(on_cpu))
    on_gpu = flags_of(args, **GPU_WITH_TE)
    assert "--moe-grouped-gemm" not in on_gpu and "--bf16" not in on_gpu
    assert "--use-flash-attn" in on_gpu  # transformer-engine chooses its attention kernel
    # Without transformer-engine a GPU still has grouped GEMM (torch's grouped_mm), and SDPA
    # chooses flash attention.
    without_te = flags_of(args, cuda_available=True, transformer_engine_available=False)
    assert "--moe-grouped-gemm" not in without_te and "--use-flash-attn" in without_te
    assert (
        model_config_from_args(args)
        .transformer_config(parallel_config_from_args(args))
        .moe_grouped_gemm
    )
    assert set(TOPK_ONLY_FLAGS) <= set(on_gpu)
    # The overrides agree: on GPUs with transformer-engine the fused kernels are used, except
    # the one the script turns off.
    overrides = transformer_overrides(args, **GPU_WITH_TE)
    assert overrides["bias_activation_fusion"]
    assert overrides["masked_softmax_fusion"] is False


def test_authors_script_without_relu_routing_is_the_topk_baseline():
    argv = without(without(AUTHORS_182M_REMOE, "--moe-relu-routing"), "--sequence-parallel")
    args = parse_args(argv)
    model = model_config_from_args(args)
    assert (model.router, model.moe_aux_loss_coeff, model.topk) == ("topk", 0.01, 1)
    assert not set(TOPK_ONLY_FLAGS) & set(flags_of(args, **CPU))
    overrides = transformer_overrides(args, **CPU)
    assert overrides["moe_router_pre_softmax"] is True


def test_moe_layer_recompute_reaches_megatron_as_selective_moe_recompute():
    with pytest.warns(UserWarning):
        args = parse_args(AUTHORS_182M_REMOE)
    overrides = transformer_overrides(args, **CPU)
    model, parallel = model_config_from_args(args), parallel_config_from_args(args)
    config = model.transformer_config(parallel, **overrides)
    assert (config.recompute_granularity, config.recompute_modules) == ("selective", ["moe"])


# --- (b) YAML presets and the command line ------------------------------------------------


def test_yaml_values_are_defaults_and_the_command_line_wins(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        "num_layers: 4\nlr: 1e-3\nmoe_relu_routing: true\nnum_experts: 8\nmoe_router_topk: 1\n"
        "data_path: [0.3, a, 0.7, b]\nlr_warmup_fraction: 0.01\n"
    )
    args = parse_args(
        [
            "--config",
            str(config),
            *without(TINY_FLAGS, "--lr"),
            "--num-layers",
            "6",
            "--lr-warmup-iters",
            "5",
        ]
    )
    assert args.lr == 1e-3  # from the YAML, through the flag's type
    assert args.num_layers == 6  # the command line wins
    assert args.moe_relu_routing and args.num_experts == 8
    assert split_blend(args.data_path) == (["a", "b"], [0.3, 0.7])
    # --lr-warmup-iters on the command line replaces the YAML's warm-up fraction.
    assert (args.lr_warmup_iters, args.lr_warmup_fraction) == (5, None)
    assert {"lr", "num_layers", "moe_relu_routing", "data_path"} <= args.given


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*m_*.yaml")), ids=lambda path: path.stem)
def test_shipped_config_is_the_papers_setup(path):
    size, router_name = path.stem.split("_")
    args = parse_args(["--config", str(path), *PATHS_ON_COMMAND_LINE])
    model = model_config_from_args(args)
    assert (model.num_layers, model.hidden_size, model.num_attention_heads) == PAPER_SIZES[size]
    assert model.num_query_groups == 4 and model.seq_length == 1024
    assert model.dense_ffn_hidden_size == 4 * model.hidden_size
    assert model.router == SWEEP_NAMES[router_name].name
    if model.is_moe:
        assert (model.num_experts, model.topk, model.granularity) == (8, 1, 1)
        assert model.moe_expert_capacity_factor is None
        assert model.router == "lory" or model.token_dispatcher == "alltoall"
    schedule = (args.global_batch_size, args.train_iters, args.lr, args.min_lr)
    assert schedule == (512, 60000, 5e-4, 5e-5) and args.lr_warmup_fraction == 0.01
    assert (args.clip_grad, args.adam_beta1, args.adam_beta2, args.lr_decay_style) == (
        1.0,
        0.9,
        0.999,
        "cosine",
    )
    assert (args.split, args.make_vocab_size_divisible_by, args.bf16) == ("969,30,1", 1024, True)
    assert args.recompute_granularity == (
        "full"
        if size != "182m"
        else ("selective" if model.is_moe and model.router != "lory" else None)
    )
    # On the paper's machines every flag of a shipped config does something.
    assert ineffective_flags(args, **GPU_WITH_TE) == []
    overrides = transformer_overrides(args, **CPU)
    model.transformer_config(parallel_config_from_args(args), **overrides)


def test_the_nine_configs_and_the_table_2_baselines_ship():
    names = {path.stem for path in CONFIG_DIR.glob("*m_*.yaml")}
    baselines = {f"182m_{kind}" for kind in ("hash", "ec", "sparsemixer", "lory")}
    assert names == baselines | {
        f"{size}_{kind}" for size in PAPER_SIZES for kind in ("dense", "moe", "remoe")
    }


def test_demo_config_is_a_cpu_sized_remoe_on_the_demo_corpus(capsys):
    args = parse_args(["--config", str(CONFIG_DIR / "demo.yaml")])
    assert args.demo_corpus and model_config_from_args(args).router == "relu"
    # The demo corpus brings its own data and tokenizer; naming others is a mistake.
    err = parse_error(["--config", str(CONFIG_DIR / "demo.yaml"), "--data-path", "x"], capsys)
    assert "--demo-corpus sets the data and tokenizer itself; drop --data-path" in err


def test_the_command_line_switches_off_what_the_yaml_switches_on(capsys):
    from remoe_patches.cli.arguments import parse_command_line

    demo = ["--config", str(CONFIG_DIR / "demo.yaml")]
    run = parse_command_line(
        [*demo, "--no-demo-corpus", "--data-path", "P", "--vocab-file", "V", "--merge-file", "M"]
    )
    assert not run.config.data.demo_corpus and run.config.data.data_path == ("P",)
    assert "demo_corpus" not in run.args.given  # switched back: as if not given
    hashed = parse_command_line([*demo, "--no-moe-relu-routing", "--moe-router-type", "hash"])
    assert hashed.config.model.router == "hash" and not hashed.args.moe_relu_routing
    assert hashed.config.model.num_layers == 4  # the rest stays the YAML's
    # Megatron-LM's --no-X flags keep their meaning and get the opposite --X
    args = parse_args(TINY_FLAGS + ["--no-load-optim", "--no-masked-softmax-fusion"])
    assert args.no_load_optim and not args.masked_softmax_fusion
    args = parse_args(TINY_FLAGS + ["--no-load-optim", "--load-optim", "--masked-softmax-fusion"])
    assert not args.no_load_optim and args.masked_softmax_fusion
    assert not {"no_load_optim", "masked_softmax_fusion"} & args.given
    # a switched-off flag is not listed as having no effect
    assert flags_of(parse_args(TINY_FLAGS + ["--use-flash-attn"]), **CPU) == ["--use-flash-attn"]
    switched_off = parse_args(TINY_FLAGS + ["--use-flash-attn", "--no-use-flash-attn"])
    assert flags_of(switched_off, **CPU) == []
    err = parse_error(TINY_FLAGS + ["--demo-corpus", "false"], capsys)
    assert (
        "unexpected value 'false': an on/off flag takes no value (--X switches it on, "
        "--no-X off)" in err
    )


def test_every_on_off_flag_has_its_opposite():
    from remoe_patches.cli.arguments import build_parser

    parser = build_parser()
    flags = parser._option_string_actions
    for flag, action in flags.items():
        if flag.startswith("--") and action.nargs == 0 and action.dest != "help":
            opposite = "--" + flag[5:] if flag.startswith("--no-") else "--no-" + flag[2:]
            assert opposite in flags or flag == "--disable-bias-linear", flag


# --- (c) unknown flags and keys ---------------------------------------------------------


@pytest.mark.parametrize("typo", ["--num-layer", "--num-lay", "--num-layer=12"])
def test_unknown_flag_names_the_closest_one(typo, capsys):
    err = parse_error(TINY_FLAGS + [typo, "12"], capsys)
    assert f"unknown flag {typo.split('=')[0]}; did you mean --num-layers?" in err


@pytest.mark.parametrize(
    "flag, reason",
    [
        ("--fsdp-double-buffer", "pretrain_gpt.py --help lists what is"),
        ("--decrease-batch-size-if-needed", "pretrain_gpt.py --help lists what is"),
        ("--fp8-format", "FP8 training is not built here (use --bf16)"),
    ],
)
def test_a_megatron_lm_flag_not_built_here_is_named_so(flag, reason, capsys):
    """Not "did you mean" an unrelated flag of ours."""
    err = parse_error(TINY_FLAGS + [flag, "1"], capsys)
    assert f"Megatron-LM's {flag} is not supported here" in err and reason in err
    assert "did you mean" not in err


def test_an_unknown_flag_far_from_every_known_one_gets_no_guess(capsys):
    err = parse_error(TINY_FLAGS + ["--frobnicate"], capsys)
    assert "unknown flag --frobnicate (see --help)" in err


def test_the_megatron_lm_flag_list_is_megatron_lms():
    """The generated list holds Megatron-LM 0.16.1's flags: every flag this parser shares with
    it, its MoE and profiling flags; not ReMoE's own."""
    from remoe_patches.cli.arguments import build_parser, megatron_lm_flags

    flags = megatron_lm_flags()
    assert {
        "--profile",
        "--use-pytorch-profiler",
        "--wandb-project",
        "--rampup-batch-size",
        "--num-experts",
        "--moe-router-topk",
        "--async-save",
    } <= flags
    assert not {"--moe-relu-routing", "--demo-corpus", "--max-skipped-steps"} & flags
    ours = {flag for action in build_parser()._actions for flag in action.option_strings}
    shared = {"--num-layers", "--seq-length", "--lr", "--save", "--bf16", "--split"}
    assert shared <= ours & flags


def test_unknown_yaml_key_names_file_key_and_closest_key(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("num_layer: 12\n")
    err = parse_error(["--config", str(config), *TINY_FLAGS], capsys)
    assert (
        str(config) in err
        and "key num_layer is not a pretrain_gpt.py flag; did you mean num_layers?" in err
    )


def test_yaml_switch_needs_a_boolean(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("swiglu: 3\n")
    err = parse_error(["--config", str(config), *TINY_FLAGS], capsys)
    assert str(config) in err and "swiglu takes true or false" in err


def test_yaml_lists_give_the_flags_of_several_values(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("profile_ranks: [0, 2]\n")
    assert parse_run_config(["--config", str(config), *TINY_FLAGS]).logging.profile_ranks == (0, 2)
    config.write_text("lr: [1, 2]\n")
    assert "lr takes one value, not a list" in parse_error(
        ["--config", str(config), *TINY_FLAGS], capsys
    )


# --- (d) one line per mistake ---------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, expected",
    [
        (
            TINY_FLAGS + ["--lr-warmup-iters", "10", "--lr-warmup-fraction", "0.1"],
            "--lr-warmup-fraction",
        ),
        (
            TINY_FLAGS + ["--global-batch-size", "7"],
            "--global-batch-size 7 is not divisible by --micro-batch-size 2",
        ),
        (TINY_FLAGS + ["--num-experts", "4", "--moe-router-topk", "5"], "--moe-router-topk 5"),
        (TINY_MOE_FLAGS + ["--moe-granularity", "5"], "--moe-granularity 5: does not divide"),
        (
            TINY_MOE_FLAGS + ["--moe-relu-routing", "--moe-expert-capacity-factor", "1.0"],
            "--moe-expert-capacity-factor",
        ),
        (
            TINY_MOE_FLAGS + ["--moe-relu-routing", "--moe-pad-expert-input-to-capacity"],
            "--moe-pad-expert-input-to-capacity",
        ),
        (
            TINY_MOE_FLAGS + ["--moe-relu-routing", "--moe-token-dispatcher-type", "flex"],
            "--moe-token-dispatcher-type flex",
        ),
        (
            TINY_MOE_FLAGS + ["--moe-token-dispatcher-type", "alltoall_seq"],
            "--moe-token-dispatcher-type",
        ),
        (TINY_FLAGS + ["--moe-relu-routing"], "--moe-relu-routing needs --num-experts"),
        (TINY_FLAGS + ["--fp16"], "--fp16 is not supported: use --bf16"),
        (without(TINY_FLAGS, "--num-layers"), "missing required flag(s): --num-layers"),
        (without(TINY_FLAGS, "--hidden-size"), "missing required flag(s): --hidden-size"),
        (
            without(TINY_FLAGS, "--num-attention-heads"),
            "missing required flag(s): --num-attention-heads",
        ),
        (without(TINY_FLAGS, "--seq-length"), "missing required flag(s): --seq-length"),
        (TINY_FLAGS + ["--train-samples", "100"], "--train-iters and --train-samples"),
        (without(TINY_FLAGS, "--swiglu"), "--swiglu must be given"),
        (without(TINY_FLAGS, "--normalization"), "--normalization must be RMSNorm, not LayerNorm"),
        (
            without(TINY_FLAGS, "--untie-embeddings-and-output-weights"),
            "--untie-embeddings-and-output-weights must be given",
        ),
        (
            without(TINY_FLAGS, "--position-embedding-type"),
            "--position-embedding-type must be rope",
        ),
        (without(TINY_FLAGS, "--disable-bias-linear"), "--disable-bias-linear must be given"),
        (without(TINY_FLAGS, "--hidden-dropout"), "--hidden-dropout must be 0.0, not 0.1"),
        (without(TINY_FLAGS, "--attention-dropout"), "--attention-dropout must be 0.0, not 0.1"),
        (TINY_FLAGS + ["--group-query-attention", "--num-query-groups", "3"], "--num-query-groups"),
        (
            TINY_MOE_FLAGS + ["--tensor-model-parallel-size", "2"],
            "--sequence-parallel: MoE layers at TP=2 need sequence parallelism",
        ),
        (TINY_FLAGS + ["--context-parallel-size", "2"], "--context-parallel-size must be 1"),
        (TINY_FLAGS + ["--expert-tensor-parallel-size", "2"], "--expert-tensor-parallel-size"),
        (
            TINY_FLAGS + ["--recompute-granularity", "full"],
            "--recompute-granularity full needs --recompute-method",
        ),
        (TINY_FLAGS + ["--recompute-num-layers", "1"], "need --recompute-granularity full"),
        (
            without(TINY_MOE_FLAGS, "--moe-router-pre-softmax"),
            "--moe-router-topk 1 needs --moe-router-pre-softmax",
        ),
        (TINY_FLAGS + ["--data-path", "0.5", "a", "b", "c"], "--data-path mixes"),
        (TINY_FLAGS + ["--vocab-file", "vocab.json"], "needs both --vocab-file and --merge-file"),
        (TINY_FLAGS + ["--max-position-embeddings", "16"], "--max-position-embeddings 16"),
        (TINY_FLAGS + ["--optimizer", "sgd"], "--optimizer"),
        (
            TINY_MOE_FLAGS + ["--moe-relu-routing", "--moe-permute-fusion"],
            "--moe-relu-routing excludes --moe-permute-fusion",
        ),
        (
            TINY_FLAGS + ["--overlap-param-gather", "--overlap-grad-reduce"],
            "--overlap-param-gather needs --use-distributed-optimizer",
        ),
        (
            TINY_FLAGS + ["--overlap-param-gather", "--use-distributed-optimizer"],
            "--overlap-param-gather needs --overlap-grad-reduce",
        ),
        (TINY_MOE_FLAGS + ["--moe-router-dtype", "bf16"], "--moe-router-dtype"),
    ],
)
def test_mistakes_are_one_line_naming_the_flag(argv, expected, capsys):
    assert expected in parse_error(argv, capsys)


def test_dense_model_lists_moe_flags_and_unsupported_logging():
    args = parse_args(
        TINY_FLAGS + ["--moe-grouped-gemm", "--num-workers", "2", "--num-query-groups", "2"]
    )
    listed = dict(ineffective_flags(args, **GPU_WITH_TE))
    assert listed.keys() == {"--moe-grouped-gemm", "--num-workers", "--num-query-groups"}
    assert "dense" in listed["--moe-grouped-gemm"]
    assert model_config_from_args(args).num_query_groups == 4  # every head keeps its own K/V


def test_zero_experts_with_remoe_routing_is_refused_naming_both_flags(capsys):
    # issue 26: the ReMoE config with --num-experts 0 trained a dense model without a word
    line = parse_error(
        ["--config", str(CONFIG_DIR / "182m_remoe.yaml"), "--num-experts", "0", "--mock-data"],
        capsys,
    )
    assert "--num-experts 0 contradicts --moe-relu-routing" in line
    line = parse_error(TINY_FLAGS + ["--num-experts", "0", "--moe-router-type", "hash"], capsys)
    assert "--num-experts 0 contradicts --moe-router-type hash" in line
    assert "--num-experts -1 must be >= 1" in parse_error(
        TINY_FLAGS + ["--num-experts", "-1"], capsys
    )


def test_zero_experts_is_a_dense_model_that_lists_the_moe_flags():
    args = parse_args(
        ["--config", str(CONFIG_DIR / "182m_moe.yaml"), "--num-experts", "0", "--mock-data"]
    )
    assert model_config_from_args(args).router == "dense"
    listed = dict(ineffective_flags(args, **GPU_WITH_TE))
    assert listed["--moe-router-topk"] == "dense model (--num-experts 0)"


def test_router_dtype_flag_and_its_default():
    assert model_config_from_args(parse_args(TINY_MOE_FLAGS)).moe_router_dtype is None
    explicit = parse_args(TINY_MOE_FLAGS + ["--moe-router-dtype", "fp64", "--bf16"])
    model = model_config_from_args(explicit)
    assert model.moe_router_dtype == "fp64"
    assert model.transformer_config(parallel_config_from_args(explicit)).moe_router_dtype == "fp64"
    # From 32 experts (E x G) the router runs in fp32 unless told otherwise, TopK and ReLU alike.
    for extra in (["--moe-granularity", "4"], ["--moe-relu-routing", "--moe-granularity", "4"]):
        fine_grained = parse_args(TINY_MOE_FLAGS + extra)
        assert model_config_from_args(fine_grained).moe_router_dtype == "fp32", extra


def test_permute_fusion_stays_available_to_topk():
    args = parse_args(TINY_MOE_FLAGS + ["--moe-permute-fusion"])
    assert transformer_overrides(args, **GPU_WITH_TE)["moe_permute_fusion"] is True


def test_topk_flags_of_megatron_lm_reach_megatron():
    args = parse_args(
        TINY_MOE_FLAGS
        + [
            "--moe-router-topk-scaling-factor",
            "8",
            "--moe-input-jitter-eps",
            "0.01",
            "--moe-z-loss-coeff",
            "1e-3",
            "--moe-expert-capacity-factor",
            "1.0",
            "--moe-token-drop-policy",
            "position",
        ]
    )
    overrides = transformer_overrides(args, **CPU)
    assert (
        overrides["moe_router_topk_scaling_factor"],
        overrides["moe_input_jitter_eps"],
        overrides["moe_z_loss_coeff"],
        overrides["moe_token_drop_policy"],
    ) == (8.0, 0.01, 1e-3, "position")
    assert not set(flags_of(args, **CPU)) & {
        "--moe-router-topk-scaling-factor",
        "--moe-input-jitter-eps",
        "--moe-token-drop-policy",
    }
    # aux-loss-free balancing: sigmoid scores (no pre-softmax needed at k=1) with a bias
    free = parse_args(
        without(TINY_MOE_FLAGS, "--moe-router-pre-softmax")
        + [
            "--moe-router-score-function",
            "sigmoid",
            "--moe-router-enable-expert-bias",
            "--moe-router-bias-update-rate",
            "0.01",
            "--moe-router-load-balancing-type",
            "none",
        ]
    )
    overrides = transformer_overrides(free, **CPU)
    assert (
        overrides["moe_router_score_function"],
        overrides["moe_router_enable_expert_bias"],
        overrides["moe_router_bias_update_rate"],
    ) == ("sigmoid", True, 0.01)


def test_topk_flags_have_no_effect_under_relu_routing():
    args = parse_args(
        TINY_MOE_FLAGS
        + [
            "--moe-relu-routing",
            "--moe-router-topk-scaling-factor",
            "8",
            "--moe-input-jitter-eps",
            "0.01",
            "--moe-router-score-function",
            "sigmoid",
        ]
    )
    listed = dict(ineffective_flags(args, **CPU))
    for flag in (
        "--moe-router-topk-scaling-factor",
        "--moe-input-jitter-eps",
        "--moe-router-score-function",
    ):
        assert "TopK only" in listed[flag], flag
    overrides = transformer_overrides(args, **CPU)
    assert "moe_router_topk_scaling_factor" not in overrides


def test_expert_bias_needs_sigmoid_scores(capsys):
    line = parse_error(TINY_MOE_FLAGS + ["--moe-router-enable-expert-bias"], capsys)
    assert "--moe-router-enable-expert-bias needs --moe-router-score-function sigmoid" in line


def test_every_missing_recipe_flag_is_reported_at_once(capsys):
    line = parse_error(TINY_SIZE_FLAGS, capsys)  # Megatron-LM's defaults for the recipe
    for needle in (
        "--normalization must be RMSNorm",
        "--swiglu must be given",
        "--untie-embeddings-and-output-weights must be given",
        "--position-embedding-type must be rope",
        "--disable-bias-linear must be given",
        "--hidden-dropout must be 0.0",
        "--attention-dropout must be 0.0",
    ):
        assert needle in line, needle


def test_demo_corpus_gets_megatron_lms_default_split():
    args = parse_args(
        [*without(TINY_FLAGS, "--train-iters"), "--train-iters", "2", "--demo-corpus"]
    )
    assert args.split == "969, 30, 1"


def test_gradient_accumulation_fusion_flag_is_noted_by_apex_kernel_not_transformer_engine():
    args = parse_args([*TINY_FLAGS, "--no-gradient-accumulation-fusion"])
    assert "--no-gradient-accumulation-fusion" in flags_of(args, **GPU_WITH_TE)
    assert "--no-gradient-accumulation-fusion" not in flags_of(
        args, **GPU_WITH_TE, wgrad_fusion_available=True
    )
    assert "--no-gradient-accumulation-fusion" not in flags_of(
        args, cuda_available=True, transformer_engine_available=False, wgrad_fusion_available=True
    )


def test_flag_declarations_say_when_the_flag_has_no_effect():
    """``note``, ``needs`` and ``speed_only`` on a flag's declaration (``flag_fields``)."""
    given = ["--async-save", "--moe-token-drop-policy", "position", "--no-masked-softmax-fusion"]
    listed = dict(ineffective_flags(parse_args([*TINY_MOE_FLAGS, *given]), **CPU))
    assert listed == {
        "--async-save": "needs --use-persistent-ckpt-worker, as in Megatron-LM; checkpoints are "
        "written synchronously",
        "--moe-token-drop-policy": "only with --moe-expert-capacity-factor (token dropping)",
        "--no-masked-softmax-fusion": "speed-only on GPUs; no effect on CPU",
    }
    on_gpu = flags_of(parse_args([*TINY_MOE_FLAGS, *given]), **GPU_WITH_TE)
    assert set(on_gpu) == {"--async-save", "--moe-token-drop-policy"}
    dense = dict(ineffective_flags(parse_args([*TINY_FLAGS, *given]), **CPU))
    assert dense["--moe-token-drop-policy"] == "dense model (no --num-experts)"  # comes first
    both = parse_args([*TINY_FLAGS, "--async-save", "--use-persistent-ckpt-worker"])
    assert flags_of(both, **CPU) == []
    tokenizer = ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", "t.model"]
    args = parse_args([*TINY_FLAGS, *tokenizer, "--vocab-file", "v.json", "--merge-file", "m.txt"])
    listed = dict(ineffective_flags(args, **CPU))
    assert listed["--vocab-file"] == "unused by --tokenizer-type SentencePieceTokenizer"
    assert "--tokenizer-model" not in listed
