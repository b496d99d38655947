"""memtrain's ``TrainingArguments``: HF's, with every memtrain optimizer name and memtrain's own flags."""
from __future__ import annotations

from dataclasses import dataclass, field

import transformers
from transformers.training_args import OptimizerNames

from ..optim import registry
from ..optim.layerwise import GLOBAL_CLIP_MESSAGE
from . import engines
from .factory import HF_OPTIMIZERS, _optim_name, is_memtrain_optimizer, optimizer_kwargs_from_args


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    """HF ``TrainingArguments`` whose ``optim`` also accepts every memtrain optimizer name.

    HF names keep HF's meaning, except ``adafactor``, which is memtrain's own implementation (identical to
    HF's Trainer ``adafactor`` at default options). ``optim_args="k=v,k=v"`` is parsed into the optimizer's
    typed keyword options and validated here, so mistakes fail at argument-parsing time.
    """

    optim: str = field(
        default="adamw_torch",
        metadata={"help": "Optimizer: a memtrain name (`memtrain list` lists them) or any HF OptimizerNames value."},
    )
    optim_args: str | None = field(default=None, metadata={
        "help": "The optimizer's options: 'k=v,k=v' (tuples as 0.9:0.95), a JSON object, or a mapping in a config "
                "file. `memtrain list NAME` lists NAME's options, types and defaults. Each option once; values are "
                "range-checked now."})
    print_param_groups: bool = field(
        default=False, metadata={"help": "Print the resolved parameter routing (role, method, lr, wd per group)."}
    )
    final_eval: bool = field(
        default=True, metadata={"help": "After train(), evaluate token-weighted perplexity on the whole eval set."}
    )
    write_report: bool = field(
        default=True, metadata={"help": "After train(), print the run report and write output_dir/report.json."}
    )
    layerwise: bool = field(default=False, metadata={
        "help": "Layer-wise gradient release (memtrain optimizers): update each parameter inside backward and free "
                "its gradient at once. Needs --max_grad_norm 0 (per-parameter clipping: optim_args "
                "layerwise_clip=<norm>). Same as optim_args layerwise=true."})
    spread_matrix_updates: bool = field(default=True, metadata={
        "help": "Under DDP, with an optimizer whose matrix updates cost far more than sending them (swan, muon): each "
                "rank updates ~1/world of the matrices and broadcasts them, bitwise the same result "
                "(docs/distributed.md). false: every rank computes every update."})
    logging_nan_inf_filter: bool = field(default=False, metadata={
        "help": "HF's filter replaces a NaN/Inf step loss by the running average, so a diverged run logs a finite "
                "(or 0) loss. memtrain's default false logs NaN as NaN (docs/nonfinite.md)."})
    stop_on_nonfinite: bool = field(default=True, metadata={
        "help": "Stop with an error (non-zero exit) at the first optimizer step whose loss or gradient norm is NaN "
                "or Inf (docs/nonfinite.md). false: train on, logging NaN as NaN."})
    resume_fresh_optimizer: bool = field(default=False, metadata={
        "help": "With --resume_from_checkpoint: restore the weights and the step count only, and start a fresh "
                "optimizer (any --optim / optim_args), the lr schedule at the checkpoint's step, and fresh RNG "
                "streams (docs/resume.md). Needed when optimizer.pt/scheduler.pt/RNG state is missing or when the "
                "optimizer settings changed."})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "memtrain pretrain/finetune refuse an output_dir that already holds a run (report.json, a model, "
                "checkpoints) unless resuming; true: write over it."})

    def __post_init__(self):
        name = _optim_name(self.optim)
        self.optim_args = registry.normalize_optim_args(self.optim_args)  # a mapping or JSON -> "k=v,k=v"
        _check_numbers(self)
        if is_memtrain_optimizer(name):
            options = registry.parse_optim_args(name, self.optim_args)  # fail now on a bad option
            self.optim = OptimizerNames.ADAMW_TORCH.value  # HF validates its own enum; restore ours after
            super().__post_init__()
            self.optim = name
            kwargs = optimizer_kwargs_from_args(self)
            registry.check_option_values(name, {k: v for k, v in kwargs.items() if k not in ("lr", "weight_decay")},
                                         lr=kwargs["lr"], weight_decay=kwargs["weight_decay"])
            if self.layerwise or options.get("layerwise", False):
                self._check_layerwise()  # after HF's __post_init__, which resolves the FSDP version
        elif name in HF_OPTIMIZERS:
            if self.layerwise:
                raise ValueError(f"--layerwise needs a memtrain optimizer, not HF's {name!r}; memtrain optimizers: "
                                 f"{', '.join(registry.optimizer_names())}")
            super().__post_init__()
        else:
            raise ValueError(
                f"unknown optimizer {name!r}. memtrain optimizers: {', '.join(registry.optimizer_names())}. "
                f"Hugging Face optimizers: {', '.join(HF_OPTIMIZERS)}."
            )

    def _check_layerwise(self) -> None:
        """Refuse what layer-wise release cannot do, before any training starts (docs/layerwise.md, What it refuses)."""
        if self.max_grad_norm and self.max_grad_norm > 0:
            raise ValueError(f"{GLOBAL_CLIP_MESSAGE} (got max_grad_norm={self.max_grad_norm})")
        if engines.deepspeed_requested(self):
            raise ValueError("layer-wise release does not support DeepSpeed ZeRO: ZeRO reduces the gradients into "
                             "its own flat buffers and hands the optimizer flat partitions, so no per-parameter hook "
                             "sees a final gradient. Use FSDP2 (engine fsdp2: memtrain engines), DDP or a single "
                             "process, or turn layerwise off")
        if engines.fsdp_version(self) == 1:
            raise ValueError("layer-wise release does not support FSDP1: FSDP1 reduce-scatters one flat gradient that "
                             "mixes parameters and stores it outside autograd, so no per-parameter hook sees a final "
                             "gradient. Use FSDP2 (fsdp_version 2, engine fsdp2: memtrain engines), DDP or a single "
                             "process, or turn layerwise off")
        ckpt_kwargs = self.gradient_checkpointing_kwargs
        if self.gradient_checkpointing and isinstance(ckpt_kwargs, dict) and ckpt_kwargs.get("use_reentrant"):
            raise ValueError("layer-wise release needs non-reentrant gradient checkpointing: with use_reentrant=True a "
                             "parameter's hook can fire on a partial gradient. Set gradient_checkpointing_kwargs="
                             "{'use_reentrant': False} (the default)")


def _check_numbers(args) -> None:
    """HF's TrainingArguments accept a negative or non-finite lr, betas outside [0, 1), …, and the optimizer then
    fails (or diverges) after the data and model are built. Refuse them at parsing time, with the valid range."""
    import math

    def bad(flag, value, valid):
        raise ValueError(f"--{flag} {value!r} is out of range: it must be {valid}")

    for flag in ("learning_rate", "weight_decay", "adam_epsilon", "max_grad_norm"):
        value = getattr(args, flag)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
            bad(flag, value, "a finite number >= 0" + (" (0: no clipping)" if flag == "max_grad_norm" else ""))
    for flag in ("adam_beta1", "adam_beta2"):
        value = getattr(args, flag)
        if not 0 <= value < 1:
            bad(flag, value, "in [0, 1)")
