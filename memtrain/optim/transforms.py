"""Pure tensor functions shared by memtrain's optimizers.

Every optimizer step body is assembled from these pieces, so the math lives in one place. They take and return
plain fp32 tensors (or update fp32 tensors in place), know nothing about parameter groups, roles, sharding or
storage formats, and import only torch.
"""
from __future__ import annotations

import torch
from torch import Tensor


def adamw_t_(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """One AdamW step in the torch convention ("AdamW-T", specs/README.md §2.4), in place on fp32 tensors.

    The operation order is exactly that of ``torch.optim.AdamW(foreach=False)`` so that an fp32 parameter
    updated here is bit-identical to torch's: decoupled decay first, then the moments, then the
    bias-corrected step with ε added to the corrected square root. ``step`` is the counter after increment.
    """
    if weight_decay != 0:
        param.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2_sqrt = (1 - beta2**step) ** 0.5
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-(lr / bias_correction1))
