"""The ``mxq`` console script: one entry point whose subcommands are the ``python -m mxq.<module>`` tools.

    mxq run recipe=prune_25pct eval=quick      # == python -m mxq.run recipe=prune_25pct eval=quick
    mxq report outputs/multirun/<stamp>        # == python -m mxq.report ...
    mxq convert SRC --to gguf --out OUT        # == python -m mxq.convert ...
    mxq dequantize SRC OUT                     # == python -m mxq.dequantize ...
    mxq synth OUT --preset gpt_oss_20b         # == python -m mxq.synth ...
    mxq publish RUN_DIR --repo-id NAME         # == python -m mxq.publish.hub ... (dry run unless --push)

Each subcommand names a module with a ``main()``; the module is imported only when its subcommand runs, so
``mxq --help`` stays fast and a missing optional dependency fails only the command that needs it.
"""
from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Subcommand:
    module: str
    summary: str


SUBCOMMANDS: dict[str, Subcommand] = {
    "run": Subcommand("mxq.run", "run a recipe: statistics, plan, apply, export, evaluate (Hydra overrides)"),
    "report": Subcommand("mxq.report", "ablation report over a sweep folder (table, CSV, plots)"),
    "convert": Subcommand("mxq.convert", "convert a checkpoint to another layout or engine format (gguf, ...)"),
    "dequantize": Subcommand("mxq.dequantize", "write a bf16 copy of a compressed checkpoint"),
    "synth": Subcommand("mxq.synth", "write a synthetic checkpoint in the exact gpt-oss layout"),
    "publish": Subcommand("mxq.publish.hub", "check a run's export and upload it to the Hugging Face Hub (dry run)"),
}


def usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    lines = ["usage: mxq COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {cmd.summary}" for name, cmd in SUBCOMMANDS.items()]
    lines += ["", "`mxq COMMAND --help` describes a command's arguments."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return
    name, rest = args[0], args[1:]
    cmd = SUBCOMMANDS.get(name)
    if cmd is None:
        sys.exit(f"mxq: unknown command {name!r}; one of: {', '.join(SUBCOMMANDS)}\n\n{usage()}")
    module = importlib.import_module(cmd.module)
    # Hydra's entry point (mxq.run) reads sys.argv itself; the argparse tools take argv but read it the same way
    sys.argv = [f"mxq {name}", *rest]
    module.main()


if __name__ == "__main__":
    main()
