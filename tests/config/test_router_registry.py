"""The router registry: one entry per kind, its flags wired through to ModelConfig, its builders
importable, and no router-kind comparisons left outside it."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

from remoe_patches.config import router_registry
from remoe_patches.cli.arguments import parse_run_config
from remoe_patches.config.model_config import PRESETS, ModelConfig, ParallelConfig
from remoe_patches.config.flag_fields import declared_flags, flag_dest
from remoe_patches.config.router_registry import ROUTERS, SWEEP_NAMES

from command_lines import TINY_MOE_FLAGS

REPO = Path(__file__).resolve().parent.parent.parent


def test_each_kind_has_its_own_names():
    for attribute in ("name", "title", "sweep_name"):
        values = [getattr(kind, attribute) for kind in ROUTERS.values()]
        assert len(set(values)) == len(values), attribute
    assert {name: kind.name for name, kind in SWEEP_NAMES.items()} == {
        "dense": "dense",
        "moe": "topk",
        "remoe": "relu",
        "hash": "hash",
        "ec": "expert_choice",
        "sparsemixer": "sparsemixer",
        "lory": "lory",
    }
    # every sweep name is a shipped config's router: configs/<size>_<sweep name>.yaml
    for kind in ROUTERS.values():
        assert (REPO / "configs" / f"182m_{kind.sweep_name}.yaml").is_file(), kind.name


def _changed_value(option: dataclasses.Field):
    """A value of ``option`` other than its default."""
    choices = option.metadata["argparse"].get("choices")
    if choices:
        return next(choice for choice in choices if choice != option.default)
    return {int: lambda v: v + 3, float: lambda v: v * 1.5}[type(option.default)](option.default)


@pytest.mark.parametrize(
    "kind", [k for k in ROUTERS.values() if declared_flags(k.options)], ids=lambda kind: kind.name
)
def test_every_option_flag_reaches_the_model_config(kind):
    """A flag declared on an options field is parsed and lands in that field, and the other
    kinds' options are not the model's."""
    routing = ["--moe-relu-routing"] if kind.adaptive_l1 else ["--moe-router-type", kind.name]
    lory = ["--moe-lory-segment-length", "16"] if kind.name == "lory" else []
    for option, flag in declared_flags(kind.options):
        value = _changed_value(option)
        if flag == "--moe-lory-segment-length":
            value = 8  # a divisor of the tiny model's 32-token sequences
        config = parse_run_config([*TINY_MOE_FLAGS, *routing, *lory, flag, str(value)])
        assert isinstance(config.model.router_options, kind.options)
        assert getattr(config.model.router_options, option.name) == value, flag
        assert flag_dest(flag) == flag[2:].replace("-", "_")


def test_relu_load_balancing_comes_from_megatrons_flag():
    plain = parse_run_config(
        [*TINY_MOE_FLAGS, "--moe-relu-routing", "--moe-router-load-balancing-type", "none"]
    )
    assert plain.model.router_options.load_balancing is False
    relu = parse_run_config([*TINY_MOE_FLAGS, "--moe-relu-routing"])
    assert relu.model.router_options.load_balancing


@pytest.mark.parametrize("hook", ["router_builder", "block_spec", "prepare_model"])
def test_every_named_builder_imports(hook):
    for kind in ROUTERS.values():
        path = getattr(kind, hook)
        if path is not None:
            assert callable(router_registry._resolve(path)), (kind.name, path)


@pytest.mark.integration
def test_the_registry_loads_without_torch():
    code = (
        "import sys, remoe_patches.config.router_registry, remoe_patches.experiments.sweep; "
        "print('torch' in sys.modules, 'megatron' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    ).stdout
    assert out.split() == ["False", "False"]


# Modules that may still compare router kinds, and why.
KIND_NAMES_ALLOWED = {
    "router_registry.py": "the registry",
}


def test_no_router_kind_comparisons_outside_the_registry():
    kinds = "|".join(ROUTERS)
    comparison = re.compile(
        rf"""(==|!=)\s*["']({kinds})["']|["']({kinds})["']\s*(==|!=)"""
        rf"""|in\s*\((\s*["']({kinds})["']\s*,?)+\)"""
    )
    found = []
    paths = [
        *(REPO / "remoe_patches").rglob("*.py"),
        *(REPO / "tools").rglob("*.py"),
        *(REPO / "scripts").rglob("*.py"),
        REPO / "pretrain_gpt.py",
    ]
    for path in sorted(paths):
        if path.name in KIND_NAMES_ALLOWED:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if comparison.search(line):
                found.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not found, "ask the registry entry (model.kind / ROUTERS[name]) instead:\n" + "\n".join(
        found
    )


@pytest.mark.parametrize("kind", ROUTERS.values(), ids=list(ROUTERS))
def test_is_moe_says_whether_the_built_layers_hold_experts(kind):
    model = ModelConfig.preset(
        "tiny", router=kind.name, router_options=kind.default_options(PRESETS["tiny"]["seq_length"])
    )
    assert model.is_moe == kind.is_moe
    transformer = model.transformer_config(ParallelConfig())
    assert (transformer.num_moe_experts is not None) == kind.is_moe
    assert (model.nominal_active_experts > 0) == kind.is_moe
    dense_width = ModelConfig.preset("tiny", router="dense").num_parameters()
    assert (model.num_parameters() > dense_width) == kind.is_moe  # E experts of width ffn


@pytest.mark.parametrize("seq_length", [32, 64, 384, 1024, 4096])
def test_default_options_fit_the_sequence_length(seq_length):
    for kind in ROUTERS.values():
        options = kind.default_options(seq_length)
        assert isinstance(options, kind.options)
        model = ModelConfig.preset(
            "tiny", router=kind.name, seq_length=seq_length, router_options=options
        )
        assert options.validate(model) == [], kind.name
        if seq_length % 256 == 0:  # the defaults fit the paper's sequences as they are
            assert options == kind.options(), kind.name
    assert ROUTERS["lory"].default_options(64).segment_length == 64  # one segment
    assert ROUTERS["lory"].default_options(384).segment_length == 128


def test_legacy_flat_fields_name_the_options_they_became():
    seen = set()
    for kind in ROUTERS.values():
        options = {f.name for f in dataclasses.fields(kind.options)}
        assert set(kind.legacy_flat_fields.values()) <= options, kind.name
        assert set(kind.legacy_defaults) <= options, kind.name
        assert not seen & set(kind.legacy_flat_fields), kind.name  # one kind per old field
        seen |= set(kind.legacy_flat_fields)
