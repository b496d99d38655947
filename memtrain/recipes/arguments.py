"""Command-line parsing shared by the scripts: HF ``HfArgumentParser`` over our dataclasses plus memtrain's
``TrainingArguments``, with script defaults, and a YAML/JSON config file accepted in place of (or before)
the flags: ``memtrain pretrain configs/pretrain/tiny.yaml --max_steps 50``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Sequence

import yaml
from transformers import HfArgumentParser

CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


def load_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    text = path.read_text()
    data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ValueError(f"config file {str(path)!r} must hold a mapping of argument names to values")
    return data


def parse_args(dataclass_types: Sequence[type], defaults: dict[str, Any] | None = None,
               argv: Sequence[str] | None = None) -> tuple:
    """Parse ``argv`` into instances of ``dataclass_types``.

    Precedence: command-line flags > config file (first argument, if it ends in .yaml/.yml/.json) >
    ``defaults`` (the script's) > the dataclasses' own defaults. Unknown keys in the config file are an error.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(dataclass_types)
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
