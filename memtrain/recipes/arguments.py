"""Command-line parsing shared by the scripts: HF ``HfArgumentParser`` over our dataclasses plus memtrain's
``TrainingArguments``, with script defaults, and a YAML/JSON config file accepted in place of (or before)
the flags: ``memtrain pretrain configs/pretrain/tiny.yaml --max_steps 50``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import torch
import yaml
import transformers
from transformers import HfArgumentParser
from transformers.hf_argparser import string_to_bool

#: The TrainingArguments defaults both jobs start from: a few minutes on a 2-core CPU. Each job adds its own; flags and
#: config files override them.
JOB_DEFAULTS = {
    "optim": "adamw",
    "learning_rate": 1e-3,
    "per_device_train_batch_size": 16,
    "per_device_eval_batch_size": 32,
    "logging_steps": 25,
    "save_strategy": "no",
    "eval_strategy": "no",
    "seed": 42,
    "use_cpu": not torch.cuda.is_available(),
}


@dataclasses.dataclass
class BlockArguments:
    """How both jobs turn text into fixed-length training and eval blocks."""

    text_column: str = dataclasses.field(default="text", metadata={
        "help": "Text field of .jsonl / parquet / datasets inputs."})
    seq_len: int = dataclasses.field(default=128, metadata={"help": "Tokens per training/eval block."})
    val_fraction: float = dataclasses.field(default=0.05, metadata={"help": "Fraction of documents held out for eval."})
    max_train_samples: int | None = dataclasses.field(default=None, metadata={
        "help": "Use only the first N training blocks."})
    max_eval_samples: int | None = dataclasses.field(default=None, metadata={
        "help": "Use only the first N eval blocks (with --streaming: the eval set's size, default 64)."})

CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


def load_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    text = path.read_text()
    data = json.loads(text, object_pairs_hook=_unique_keys(path)) if path.suffix == ".json" else \
        yaml.load(text, Loader=_unique_key_loader(path))
    if not isinstance(data, dict):
        raise ValueError(f"config file {str(path)!r} must hold a mapping of argument names to values")
    return data


def _unique_keys(path: Path):
    """A key given twice in a config file (``optim_args: {rank: 4, rank: 8}``) is refused: YAML and JSON parsers
    keep the last one silently."""
    def pairs(items):
        keys = [k for k, _ in items]
        repeated = sorted({str(k) for k in keys if keys.count(k) > 1})
        if repeated:
            raise ValueError(f"config file {str(path)!r} gives {', '.join(repeated)} more than once; give each key "
                             "once")
        return dict(items)
    return pairs


def _unique_key_loader(path: Path) -> type:
    check = _unique_keys(path)

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            # the mapping's own keys only: a key that overrides a merged (<<: *anchor) one is YAML's intent
            check([(self.construct_object(k, deep=deep), None) for k, _ in node.value
                   if k.tag != "tag:yaml.org,2002:merge"])
            return super().construct_mapping(node, deep=deep)

    return Loader


def parse_args(dataclass_types: Sequence[type], defaults: dict[str, Any] | None = None,
               argv: Sequence[str] | None = None) -> tuple:
    """Parse ``argv`` into instances of ``dataclass_types``.

    Precedence: command-line flags > config file (first argument, if it ends in .yaml/.yml/.json) >
    ``defaults`` (the script's) > the dataclasses' own defaults. Unknown keys in the config file are an error.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(dataclass_types)
    _memtrain_flags_first(parser, dataclass_types)
    merged = dict(defaults or {})
    if argv and argv[0].endswith(CONFIG_SUFFIXES):
        config = load_config_file(argv.pop(0))
        known = {action.dest for action in parser._actions}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"unknown argument(s) in config file: {', '.join(unknown)}")
        merged.update(config)
    # A required dataclass field (output_dir has none in some versions) may come from the defaults.
    for action in parser._actions:
        if action.dest in merged:
            action.required = False
    parser.set_defaults(**merged)
    return parser.parse_args_into_dataclasses(args=argv)



def wants_list_optimizers(argv: Sequence[str]) -> bool:
    """``--list_optimizers``, ``--list-optimizers``, ``--list_optimizers=true``…: read before anything else, so
    that listing never builds arguments, data or a model (and never starts a run)."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--list_optimizers", "--list-optimizers", type=string_to_bool, nargs="?", const=True,
                     default=False)
    known, _ = pre.parse_known_args(list(argv))
    return bool(known.list_optimizers)


HELP_EPILOG = ("`memtrain list` lists the registered optimizers; `memtrain list NAME` lists one optimizer's "
               "optim_args options with their types and defaults (e.g. `memtrain list swan`). Every flag is "
               "accepted with underscores or dashes (--max_steps, --max-steps).")


def _memtrain_flags_first(parser: HfArgumentParser, dataclass_types: Sequence[type]) -> None:
    """``--help`` lists memtrain's own flags (the job's dataclass, memtrain's TrainingArguments fields, --optim and
    --optim_args) in one group before HF's ~150 TrainingArguments flags, and says how to list an optimizer."""
    hf_fields = {f.name for f in dataclasses.fields(transformers.TrainingArguments)}
    own = {"optim", "optim_args", "logging_nan_inf_filter"}
    for cls in dataclass_types:
        names = {f.name for f in dataclasses.fields(cls)}
        own |= names if not issubclass(cls, transformers.TrainingArguments) else names - hf_fields
    group = parser.add_argument_group("memtrain options")
    for old in parser._action_groups:
        for action in [a for a in old._group_actions if a.dest in own]:
            old._group_actions.remove(action)
            group._group_actions.append(action)
    parser._action_groups.remove(group)
    parser._action_groups.insert(0, group)
    parser.epilog = HELP_EPILOG


#: What marks a directory as holding a run: a report, a saved model or adapter, checkpoints.
RUN_MARKERS = ("report.json", "config.json", "model.safetensors", "pytorch_model.bin", "adapter_model.safetensors",
               "adapter_config.json")


def check_output_dir(args) -> None:
    """Refuse an output_dir that already holds a run (its report, model and checkpoints would be mixed with the
    new run's) unless the run resumes from a checkpoint or --overwrite_output_dir is given."""
    out = Path(args.output_dir)
    if not out.is_dir() or args.resume_from_checkpoint or getattr(args, "overwrite_output_dir", False):
        return
    found = [m for m in RUN_MARKERS if (out / m).exists()] + sorted(p.name for p in out.glob("checkpoint-*"))
    if found:
        raise ValueError(f"--output_dir {str(out)!r} already holds a run ({', '.join(found[:4])}); choose a new "
                         "directory, resume it with --resume_from_checkpoint, or pass --overwrite_output_dir true")


def check_run_arguments(args, *, seq_len: int, max_eval_samples: int | None, max_train_samples: int | None,
                        config=None, model: str = "") -> None:
    """What can be checked before any data or model is built: sizes, and seq_len against the model's positions."""
    if seq_len < 1:
        raise ValueError(f"--seq_len must be >= 1, got {seq_len}")
    if max_train_samples is not None and max_train_samples < 1:
        raise ValueError(f"--max_train_samples must be >= 1 (or unset for all), got {max_train_samples}")
    if max_eval_samples is not None and (max_eval_samples < 0 or max_eval_samples == 0 and args.final_eval):
        raise ValueError(f"--max_eval_samples {max_eval_samples} leaves no eval block, so the final evaluation would "
                         "fail after training; use >= 1 (or unset for all), or pass --final_eval false to skip it")
    positions = getattr(config, "max_position_embeddings", None) if config is not None else None
    if isinstance(positions, int) and seq_len > positions:
        raise ValueError(f"--seq_len {seq_len} exceeds the model's max_position_embeddings={positions} ({model}): "
                         f"positions past it have no embedding. Use --seq_len {positions} or less, or a model config "
                         "with more positions")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def check_tokenizer_dir(directory: str, flag: str) -> None:
    """A tokenizer directory must hold a tokenizer: without one, loading falls back to something else and the
    run fails later with a misleading error (e.g. "fewer than seq_len tokens")."""
    path = Path(directory)
    if path.is_dir() and not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise ValueError(f"{flag} {directory!r} has no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}, …); pass "
                         "--tokenizer DIR with the tokenizer the model was trained with (memtrain pretrain saves it "
                         "next to the model)")


def run_job(job, argument_types: Sequence[type], defaults: dict[str, Any], argv: Sequence[str] | None = None):
    """What ``memtrain pretrain`` and ``memtrain finetune`` do around their job: ``--list-optimizers`` (any spelling,
    also in a config file) prints the optimizers instead of training; the CPU engine shim; parse flags and config
    file into ``argument_types``; ``job(job_args, training_args, argv)``; end the process group."""
    from ..hf.engines import enable_cpu_engines, end_process_group
    from ..optim import format_optimizers

    argv = list(sys.argv[1:] if argv is None else argv)
    if wants_list_optimizers(argv):
        print(format_optimizers())
        return None
    enable_cpu_engines()  # CPU: make accelerate's FSDP/DeepSpeed configs real (memtrain/hf/engines.py)
    job_args, args = parse_args(argument_types, defaults, argv)
    if job_args.list_optimizers:  # set in a config file
        print(format_optimizers())
        return None
    result = job(job_args, args, argv)
    end_process_group()  # on success only: after an error on one rank, a barrier would wait for the others
    return result
