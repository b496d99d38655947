"""The ``memtrain`` command: one entry point whose subcommands are memtrain's jobs and tools.

    memtrain pretrain [config.yaml] [--flags]     pretrain a model (memtrain/recipes/pretrain.py)
    memtrain finetune [config.yaml] [--flags]     fine-tune with an adapter or fully (memtrain/recipes/finetune.py)
    memtrain prepare-data DATASET --output_dir D  token shards for pretraining (memtrain/recipes/data/shards.py)
    memtrain bench [engines|layerwise|data|step|whitening]  benchmarks (memtrain/bench/)
    memtrain estimate [--flags]                   memory of a training step, simulated (memtrain/estimate.py)
    memtrain list [NAME]                          registered optimizers, or one optimizer's options
    memtrain engines [NAME]                       the engines' accelerate config files (or one's path)
    memtrain slimadam-rules --output FILE         derive SlimAdam compression rules

``python -m memtrain ...`` and ``accelerate launch -m memtrain pretrain ...`` run the same code. Each subcommand
takes exactly the flags and config files of its job; ``memtrain SUBCOMMAND --help`` lists them.
"""
from __future__ import annotations

import importlib
import sys

#: subcommand -> (module, function, one-line help). Modules load only when their subcommand runs.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "pretrain": ("memtrain.recipes.pretrain", "main", "pretrain a model from a named config with any optimizer"),
    "finetune": ("memtrain.recipes.finetune", "main", "fine-tune a saved model with a LoRA adapter or fully"),
    "prepare-data": ("memtrain.recipes.data.shards", "main", "tokenize a corpus once into memory-mapped token shards"),
    "estimate": ("memtrain.estimate", "main", "peak memory of a training step by category, simulated on fake tensors"),
    "bench": ("memtrain.bench", "main", "benchmarks: optimizers (default), engines, layerwise, data, step, whitening"),
    "engines": ("memtrain.configs", "engines_main", "the accelerate configs of the engines (ddp, fsdp2, zero1-3, ...)"),
    "list": ("memtrain.optim.registry", "list_main", "list the registered optimizers, or one optimizer's options"),
    "slimadam-rules": ("memtrain.recipes.slimadam_rules", "main", "derive SlimAdam compression rules"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: memtrain COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, _, help_) in COMMANDS.items()]
    lines += ["", "memtrain COMMAND --help shows a command's flags."]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from .version import __version__

        print(f"memtrain {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"memtrain: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module, function, _ = COMMANDS[command]
    sys.argv = [f"memtrain {command}", *rest]  # argparse/HfArgumentParser show the subcommand as the program
    result = getattr(importlib.import_module(module), function)(rest)
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
