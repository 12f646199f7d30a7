"""Config fields that declare their own ``pretrain_gpt.py`` flag, so that a flag is written once.

``flag_field`` puts the flag, its argparse group (Megatron-LM's group names), its help and any
other ``add_argument`` keywords into the dataclass field's metadata, beside the field it sets
(Megatron-LM 0.16 builds argument groups from its config dataclasses the same way).
``add_declared_flags`` adds the flags of a group to an argparse group, and ``values_from_args``
reads the parsed values back as the dataclass's keyword arguments. Standard library only.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import MISSING, field


def flag_field(default=MISSING, *, flag: str, help: str, group: str = "", **argparse_kwargs):
    """A dataclass field set by ``flag``: ``default`` (none: a required field, whose flag then
    defaults to None), the argparse ``group`` it is listed in, its ``help``, and extra
    ``add_argument`` keywords (``type``, ``choices``, ``nargs``, ``action``; ``parser_default``
    for a parser default other than the field's)."""
    metadata = dict(flag=flag, help=help, group=group, argparse=argparse_kwargs)
    return field(default=default, metadata=metadata)


def declared_flags(config_class) -> list:
    """``(field, flag)`` of the fields of ``config_class`` that declare a flag."""
    return [(f, f.metadata["flag"]) for f in dataclasses.fields(config_class)
            if f.metadata.get("flag")]


def flag_dest(flag: str) -> str:
    """argparse's attribute name of ``flag``: ``--moe-hash-seed`` -> ``moe_hash_seed``."""
    return flag[2:].replace("-", "_")


def add_declared_flags(group, name: str, config_classes) -> None:
    """Add to argparse ``group`` the flags that fields of ``config_classes`` declare in the group
    called ``name``."""
    for config_class in config_classes:
        for option, flag in declared_flags(config_class):
            if option.metadata["group"] != name:
                continue
            kwargs = dict(option.metadata["argparse"])
            default = kwargs.pop("parser_default", None if option.default is MISSING
                                 else option.default)
            if "action" not in kwargs and "type" not in kwargs and default is not None:
                kwargs["type"] = type(default)
            group.add_argument(flag, default=default, help=option.metadata["help"], **kwargs)


def values_from_args(config_class, args: argparse.Namespace) -> dict:
    """The keyword arguments of ``config_class`` that its declared flags give: on/off flags as
    bools, lists (``nargs``) as tuples."""
    values = {}
    for option, flag in declared_flags(config_class):
        value = getattr(args, option.metadata["argparse"].get("dest") or flag_dest(flag))
        if option.metadata["argparse"].get("action") in ("store_true", "store_false"):
            value = bool(value)
        elif isinstance(value, list):
            value = tuple(value)
        values[option.name] = value
    return values


def nonnegative_int(text: str) -> int:
    """argparse type: an int >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is not a non-negative integer")
    return value


def positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value
