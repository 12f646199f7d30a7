#!/usr/bin/env python3
"""Write the flag names of Megatron-LM's own ``pretrain_gpt.py`` parser to a file, once.

``pretrain_gpt.py`` answers a Megatron-LM flag it does not implement with "Megatron-LM's --X is
not supported here" rather than a guess at a similar flag of ours; it knows them from
``remoe_patches/cli/megatron_lm_flags.txt``, which this tool wrote from a Megatron-LM checkout of
the release whose megatron-core we pin:

    git clone https://github.com/NVIDIA/Megatron-LM && git -C Megatron-LM checkout core_v0.16.1
    python tools/list_megatron_lm_flags.py Megatron-LM --output \\
        remoe_patches/cli/megatron_lm_flags.txt

It builds the parser with Megatron-LM's ``add_megatron_arguments`` (its many flags generated
from its config dataclasses included), importing the checkout's ``megatron`` package. Modules
that only GPU kernels need and that are not installed here (triton) are replaced by empty
stand-ins while the parser is built; the file's header names them.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from unittest import mock


def megatron_lm_flags(checkout: Path) -> tuple:
    """(sorted long flags of Megatron-LM's parser, the modules stood in for)."""
    sys.path.insert(0, str(checkout))
    stood_in = []
    for _ in range(50):
        try:
            from megatron.training.arguments import add_megatron_arguments

            break
        except ModuleNotFoundError as error:
            if error.name.split(".")[0] == "megatron":
                raise
            stood_in.append(error.name)
            for name in [name for name in sys.modules if name.startswith("megatron")]:
                del sys.modules[name]
            sys.modules[error.name] = mock.MagicMock(
                __name__=error.name, __path__=[], __spec__=None, __version__="99.0"
            )
    else:
        raise SystemExit("list_megatron_lm_flags: too many missing modules")
    parser = add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False))
    flags = sorted(
        {
            flag
            for action in parser._actions
            for flag in action.option_strings
            if flag.startswith("--")
        }
    )
    return flags, stood_in


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkout", type=Path, help="a Megatron-LM checkout (core_v0.16.1)")
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args(argv)
    if not (args.checkout / "megatron" / "training" / "arguments.py").is_file():
        raise SystemExit(
            f"list_megatron_lm_flags: {args.checkout} is not a Megatron-LM checkout "
            "(no megatron/training/arguments.py)"
        )
    described = (
        subprocess.run(
            ["git", "-C", str(args.checkout), "describe", "--tags", "--always"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        or "unknown"
    )
    flags, stood_in = megatron_lm_flags(args.checkout)
    header = [
        f"# The long flags of Megatron-LM's pretrain_gpt.py parser at {described}",
        "# (add_megatron_arguments), written by tools/list_megatron_lm_flags.py.",
        f"# {len(flags)} flags"
        + (
            f"; stood in for while building the parser: {', '.join(stood_in)}." if stood_in else "."
        ),
    ]
    args.output.write_text("\n".join(header + flags) + "\n")
    print(f"{args.output}: {len(flags)} flags of Megatron-LM {described}")


if __name__ == "__main__":
    main()
