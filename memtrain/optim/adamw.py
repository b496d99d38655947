"""``adamw``: the baseline. AdamW in the torch convention on every parameter (docs/registry-and-routing.md, "The AdamW
conventions").

It is the base optimizer with no owned roles, so every group takes the shared AdamW path that all other
methods use as their fallback. The update is a per-parameter loop rather than torch's ``foreach`` kernels, on
purpose: ``foreach`` materialises temporaries for all parameters at once (a larger peak, which this project
exists to cut), and the loop is bit-identical to ``torch.optim.AdamW(foreach=False)`` on fp32 parameters.
State is 8 bytes per parameter (fp32 ``exp_avg`` and ``exp_avg_sq``; the step counter is a Python int), also
for bf16 parameters, whose update is computed in fp32 and rounded once.

``adam_lr`` gives the non-matrix roles (embedding, head, vectors, other) their own lr while the hidden matrices
keep ``lr``: the same two-lr freedom that methods with an AdamW fallback at ``adam_lr`` have, so a tuned
comparison can give the baseline both lrs (docs/benchmarks/README.md, "Baseline fairness").
"""
from __future__ import annotations

from .base import MemtrainOptimizer


class AdamW(MemtrainOptimizer):
    name = "adamw"
    description = "AdamW (torch convention) on every parameter; the baseline, 8 B/param of fp32 state"
    owns = frozenset()

    def __init__(self, params, *, lr: float, weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, adam_lr: float | None = None):
        """``adam_lr``: lr of every role but ``matrix`` (None: ``lr``, plain AdamW)."""
        super().__init__(params, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps, adam_lr=adam_lr)
        # The base gives every group outside ``owns`` (for adamw: all of them) adam_lr; the matrices keep lr.
        for group in self.param_groups:
            if group["role"] == "matrix":
                group["lr"] = lr

