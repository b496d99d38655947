"""Hugging Face integration: drop-in ``TrainingArguments`` / ``Trainer`` that know memtrain's optimizers, an
``optimizer_factory`` for users who keep HF's own classes, the end-of-run report, and the engine checks.

The layer above ``memtrain.optim``: it is the one package that touches the HF Trainer machinery.
"""
from .arguments import TrainingArguments
from .checkpoint import ResumeError
from .factory import (HF_OPTIMIZERS, MemtrainOptimizerFactory, find_layerwise, is_memtrain_optimizer, optimizer_factory,
                      optimizer_kwargs_from_args)
from .report import ReportCallback, format_report
from .trainer import FinalEvalError, NonfiniteError, Trainer

__all__ = ["TrainingArguments", "Trainer", "optimizer_factory", "MemtrainOptimizerFactory", "optimizer_kwargs_from_args",
           "ReportCallback", "format_report", "find_layerwise", "is_memtrain_optimizer", "HF_OPTIMIZERS",
           "ResumeError", "NonfiniteError", "FinalEvalError"]
