"""Config fields that declare their own ``pretrain_gpt.py`` flag, so that a flag is written once.

``flag_field`` puts the flag, its argparse group (Megatron-LM's group names), its help and any
other ``add_argument`` keywords into the dataclass field's metadata, beside the field it sets
(Megatron-LM 0.16 builds argument groups from its config dataclasses the same way).
``add_declared_flags`` adds the flags of a group to an argparse group, and ``values_from_args``
reads the parsed values back as the dataclass's keyword arguments. A Megatron-LM flag that sets
no field (one the LLaMA recipe fixes, one without effect here) is declared the same way on a
dataclass that lists such flags; ``must`` then names the only value accepted and ``note`` why
the flag has no effect. Standard library only.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
from dataclasses import MISSING, field


def flag_field(
    default=MISSING,
    *,
    flag: str,
    help: str,
    group: str = "",
    must=MISSING,
    refusal: str = "",
    note: str = "",
    needs: tuple = (),
    speed_only: bool = False,
    **argparse_kwargs,
):
    """A dataclass field set by ``flag``: ``default`` (none: a required field, whose flag then
    defaults to None), the argparse ``group`` it is listed in, its ``help``, and extra
    ``add_argument`` keywords (``type``, ``choices``, ``nargs``, ``action``; ``parser_default``
    for a parser default other than the field's).

    ``must``: the only value accepted (or a test ``must(value, args)``), else ``refusal`` (after
    the flag; ``str.format`` fields: ``value``, ``if_default`` and the flags' dests).

    When the flag, given, has no effect (``argument_notes`` lists it): ``needs``, ``(flag, value)``
    without which it has none (``(flag,)``: without that flag set; ``(flag, test)``: unless
    ``test(value)``); ``note``, why (alone: always; with ``needs``: in place of "needs ...", and
    required with a ``test``; ``str.format`` fields: the flags' dests); ``speed_only``: on CPU, as
    it only changes the speed on GPUs.
    """
    metadata = dict(
        flag=flag,
        help=help,
        group=group,
        argparse=argparse_kwargs,
        must=must,
        refusal=refusal,
        note=note,
        needs=needs,
        speed_only=speed_only,
    )
    return field(default=default, metadata=metadata)


def declared_flags(config_class) -> list:
    """``(field, flag)`` of the fields of ``config_class`` that declare a flag."""
    return [
        (f, f.metadata["flag"]) for f in dataclasses.fields(config_class) if f.metadata.get("flag")
    ]


def flag_dest(flag: str) -> str:
    """argparse's attribute name of ``flag``: ``--moe-hash-seed`` -> ``moe_hash_seed``."""
    return flag[2:].replace("-", "_")


def option_dest(option: dataclasses.Field) -> str:
    """argparse's attribute name of a declared field's flag (its ``dest``, if it names one)."""
    return option.metadata["argparse"].get("dest") or flag_dest(option.metadata["flag"])


def add_declared_flags(group, name: str, config_classes) -> None:
    """Add to argparse ``group`` the flags that fields of ``config_classes`` declare in the group
    called ``name``."""
    for config_class in config_classes:
        for option, flag in declared_flags(config_class):
            if option.metadata["group"] != name:
                continue
            kwargs = dict(option.metadata["argparse"])
            default = kwargs.pop(
                "parser_default", None if option.default is MISSING else option.default
            )
            if "action" not in kwargs and "type" not in kwargs and default is not None:
                kwargs["type"] = type(default)
            group.add_argument(flag, default=default, help=option.metadata["help"], **kwargs)


def refusals(config_class, args: argparse.Namespace, groups=None) -> list:
    """The refusals of the flags of ``config_class`` (in ``groups``, default all) whose value is
    not the one they ``must`` have."""
    found = []
    for option, flag in declared_flags(config_class):
        must = option.metadata["must"]
        if must is MISSING or groups is not None and option.metadata["group"] not in groups:
            continue
        dest = option_dest(option)
        value = getattr(args, dest)
        if not (must(value, args) if callable(must) else value == must):
            origin = "" if dest in args.given else " (Megatron-LM's default)"
            found.append(
                f"{flag} "
                + option.metadata["refusal"].format(value=value, if_default=origin, **vars(args))
            )
    return found


def values_from_args(config_class, args: argparse.Namespace) -> dict:
    """The keyword arguments of ``config_class`` that its declared flags give: on/off flags as
    bools, lists (``nargs``) as tuples."""
    values = {}
    for option, flag in declared_flags(config_class):
        value = getattr(args, option_dest(option))
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


def int_or_list(text: str):
    """argparse type: an int, or a list like [1,0,1,0] (Megatron-LM's --moe-layer-freq)."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = None
    if not isinstance(value, list):
        raise argparse.ArgumentTypeError(f"{text!r} is neither an int nor a list like [1,0,1,0]")
    return value
