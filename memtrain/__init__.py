"""memtrain: train and fine-tune LLMs in less memory without leaving the Hugging Face stack.

Importing memtrain has no side effects; the HF classes load on first access so that ``memtrain.optim`` stays
usable with torch alone.
"""
from .optim import build_optimizer, list_optimizers, optimizer_names, parse_optim_args
from .version import __version__

__all__ = [
    "build_optimizer", "list_optimizers", "optimizer_names", "parse_optim_args",
    "TrainingArguments", "Trainer", "optimizer_factory", "__version__",
]

_HF = ("TrainingArguments", "Trainer", "optimizer_factory")


def __getattr__(name):
    if name in _HF:
        from . import hf

        return getattr(hf, name)
    raise AttributeError(f"module 'memtrain' has no attribute {name!r}")
