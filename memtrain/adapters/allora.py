"""ALLoRA (Huang et al., arXiv 2410.09692; docs/adapters/allora.md): LoRA without dropout and without α/r scaling, whose
gradients are scaled per output row by ``c_i = 1 / sqrt(ρ_i^p + 1/η²)``, ρ_i = ‖(B A)_{i,:}‖₂ (memtrain's
reconstruction, docs/adapters/allora.md, "Math"; the paper's exact formula is unverified).

* ``norm_target="delta_row"`` (default): inside backward, the LoRA branch's upstream gradient δ is scaled column
  by column (output channel i by c_i) before ∇A and ∇B are formed; ∂L/∂x uses the unscaled δ. This needs a
  module: :class:`ALLoRALinear`, a PEFT ``lora.Linear`` subclass (installed with PEFT's custom-module hook) whose
  LoRA branch is a custom autograd Function. Saved keys, merge and unmerge are PEFT's plain LoRA ones (scaling is
  exactly 1), so the adapter loads, merges and serves as an ordinary LoRA.
* ``norm_target="factor_rows"`` (ablation): the module is plain LoRA and the optimizer rescales the gradient rows
  of each factor by its own row norms, ``1/sqrt(‖B_i‖^p + 1/η²)`` and ``1/sqrt(‖A_k‖^p + 1/η²)``, just before the
  AdamW-T update (after HF's clipping).

The factors get AdamW-T (8 B per adapter parameter); other trainable tensors keep the chosen optimizer.
"""
from __future__ import annotations

import functools
from typing import Literal

import torch
from peft import LoraConfig
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import Tensor, nn

from ..optim.base import FALLBACK
from ..optim.capabilities import engine_refusal
from .common import build_adapter_optimizer, lora_layers, named_adapter_tensors, tensor_group, unadapted_forward

METHOD = "allora"
#: Engine needs (memtrain.optim.capabilities.engine_refusal): the delta_row module reads its whole layer in forward;
#: the factor_rows reading also needs each factor's rows in the optimizer.
CAPABILITIES = {"whole_module": True}
FACTOR_ROWS_CAPABILITIES = {**CAPABILITIES, "needs_matrix_shape": True, "deepspeed": False}
NORM_TARGETS = ("delta_row", "factor_rows")


def lora_row_norm(A: Tensor, B: Tensor) -> Tensor:
    """``‖(B A)_{i,:}‖₂`` per output row i, without forming B A: ``sqrt(rowsum(B (AAᵀ) ⊙ B))``, O((m+n)·r²).

    Clamped at 0 before the root, since rounding can make a zero row's sum slightly negative."""
    return ((B @ (A @ A.T)) * B).sum(dim=1).clamp_min(0).sqrt()


def allora_scale(row_norm: torch.Tensor, eta: float, power: int) -> torch.Tensor:
    """``c = 1 / sqrt(ρ^p + 1/η²)``: η for an untouched row (ρ = 0), decaying like ρ^{-p/2}."""
    return (row_norm.pow(power) + 1.0 / eta**2).rsqrt()


class _ALLoRABranch(torch.autograd.Function):
    """``y = (x Aᵀ) Bᵀ`` whose backward scales δ's output channel i by c_i (ρ from the A, B of this forward)."""

    @staticmethod
    def forward(ctx, x, A, B, eta: float, power: int):
        ctx.save_for_backward(x, A, B)
        ctx.eta, ctx.power = eta, power
        return (x @ A.T) @ B.T

    @staticmethod
    def backward(ctx, grad_out):
        x, A, B = ctx.saved_tensors
        grad_out = grad_out.to(A.dtype)
        with torch.autocast(x.device.type, enabled=False):  # explicit dtypes, whatever the ambient autocast
            c = allora_scale(lora_row_norm(A, B), ctx.eta, ctx.power)  # [m]
            scaled = grad_out * c  # δ̃ = δ · diag(c)
            x2 = x.reshape(-1, x.shape[-1])
            s2 = scaled.reshape(-1, scaled.shape[-1])
            grad_b = s2.T @ (x2 @ A.T)  # [m, r]
            grad_a = (s2 @ B).T @ x2  # [r, n]
            grad_x = (grad_out @ B) @ A if ctx.needs_input_grad[0] else None  # unscaled δ
        return grad_x, grad_a, grad_b, None, None


class ALLoRALinear(LoraLinear):
    """PEFT LoRA ``Linear`` with ALLoRA's backward. η, ``norm_target`` and ``norm_power`` are module attributes
    bound with ``functools.partial`` at registration (``LoraConfig`` cannot carry extra fields)."""

    def __init__(self, base_layer, adapter_name, config, *, allora_eta: float = 2.0,
                 norm_target: str = "delta_row", norm_power: int = 1, **kwargs):
        super().__init__(base_layer, adapter_name, config=config, **kwargs)
        self.allora_eta = float(allora_eta)
        self.norm_target = norm_target
        self.norm_power = int(norm_power)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        unadapted = unadapted_forward(self, x, args, kwargs)
        if unadapted is not None:
            return unadapted
        result = self.base_layer(x, *args, **kwargs)
        for adapter in self.active_adapters:
            if adapter not in self.lora_A:
                continue
            A, B = self.lora_A[adapter].weight, self.lora_B[adapter].weight
            if self.norm_target == "delta_row":
                with torch.autocast(x.device.type, enabled=False):  # the LoRA branch in the factors' dtype
                    lora = _ALLoRABranch.apply(x.to(A.dtype), A, B, self.allora_eta, self.norm_power)
            else:  # factor_rows: plain LoRA forward at scaling 1; the optimizer rescales the gradients
                lora = self.lora_B[adapter](self.lora_A[adapter](self._cast_input_dtype(x, A.dtype)))
            result = result + lora.to(result.dtype)
        return result


def allora_config(r: int = 8, target_modules="all-linear", base: LoraConfig | None = None, *, eta: float = 2.0,
                  norm_target: Literal["delta_row", "factor_rows"] = "delta_row", norm_power: int = 1,
                  **fields) -> LoraConfig:
    """A ``LoraConfig`` for ALLoRA (lora_alpha = r, no dropout, no rsLoRA) with ``ALLoRALinear`` registered.
    A user config (``base``) that sets another alpha, dropout or rsLoRA is rejected, not silently changed."""
    if norm_target not in NORM_TARGETS:
        raise ValueError(f"allora norm_target must be one of {NORM_TARGETS}, got {norm_target!r}")
    if norm_power not in (1, 2):
        raise ValueError(f"allora norm_power must be 1 or 2, got {norm_power!r}")
    if not eta > 0:
        raise ValueError(f"allora eta must be > 0, got {eta!r}")
    if base is None:
        base = LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, target_modules=target_modules, **fields)
    problems = []
    if base.lora_alpha != base.r:
        problems.append(f"lora_alpha={base.lora_alpha} (must equal r={base.r}: ALLoRA has no α/r scaling)")
    if base.lora_dropout:
        problems.append(f"lora_dropout={base.lora_dropout} (must be 0: ALLoRA replaces dropout)")
    if base.use_rslora:
        problems.append("use_rslora=True (must be False: the scaling must be exactly 1)")
    if problems:
        raise ValueError("allora: the LoRA config is not an ALLoRA config: " + "; ".join(problems))
    base._register_custom_module({nn.Linear: functools.partial(
        ALLoRALinear, allora_eta=eta, norm_target=norm_target, norm_power=norm_power)})
    return base


def check_allora_model(model: nn.Module, trainable_only: bool = True) -> list:
    """The per-module guard (docs/adapters/allora.md, "Use"): every LoRA layer is an ``ALLoRALinear`` with scaling 1, no
    variant, no LoRA bias and no dropout. Returns the ``(name, module, adapter)`` triples."""
    layers = list(lora_layers(model, trainable_only))
    if not layers:
        raise ValueError("allora: the model has no trainable LoRA layers")
    for name, module, adapter in layers:
        if not isinstance(module, ALLoRALinear):
            problem = (f"is a {type(module).__name__}, not an ALLoRALinear (a non-nn.Linear target such as GPT-2's "
                       "Conv1D, or an adapter loaded without allora_config's custom module)")
        elif module.scaling[adapter] != 1.0:
            problem = f"has scaling {module.scaling[adapter]} != 1 (rank_pattern/alpha_pattern?)"
        elif adapter in module.lora_variant:
            problem = f"uses the LoRA variant {type(module.lora_variant[adapter]).__name__}"
        elif module.lora_bias[adapter]:
            problem = "has lora_bias=True (the ALLoRA branch has no bias)"
        elif not isinstance(module.lora_dropout[adapter], nn.Identity):
            problem = "has LoRA dropout"
        else:
            continue
        raise ValueError(f"allora: LoRA layer {name!r} (adapter {adapter!r}) {problem}")
    return layers


class ALLoRAFactorRowsMixin:
    """``norm_target="factor_rows"``: rescale each factor's gradient rows in place, then the group's AdamW-T."""

    def _update_fn(self, group):
        if group.get("adapter") == METHOD and group.get("allora_factor_rows"):
            return functools.partial(_factor_rows_update, self)
        return super()._update_fn(group)


def _factor_rows_update(optimizer, param, grad, state, group, rows) -> None:
    if param.dim() != 2:
        raise RuntimeError(engine_refusal("flat", "allora (norm_target='factor_rows')", **FACTOR_ROWS_CAPABILITIES,
                                          alternative="norm_target='delta_row'"))
    c = allora_scale(param.detach().float().norm(dim=1, keepdim=True), group["allora_eta"], group["allora_power"])
    optimizer.adamw_update(param, grad.float() * c, state, group, rows)


def create_allora_optimizer(model: nn.Module, optim: str = "adamw", *, lr: float, weight_decay: float = 0.0,
                            betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                            optim_args: str | None = None, **options):
    """AdamW-T on every ALLoRA factor (the factor-rows rescaling first, if the modules use that reading); the
    registered optimizer ``optim`` on every other trainable tensor."""
    layers = check_allora_model(model)
    tensors = [t for name, module, adapter in layers for t in named_adapter_tensors(model, name, module, adapter)]
    norm_targets = {module.norm_target for _, module, _ in layers}
    if len(norm_targets) != 1 or len({(m.allora_eta, m.norm_power) for _, m, _ in layers}) != 1:
        raise ValueError("allora: all ALLoRA layers must share eta, norm_target and norm_power")
    module = layers[0][1]
    group = tensor_group(tensors, adapter=METHOD, method=FALLBACK, betas=tuple(betas), eps=float(eps),
                         allora_factor_rows=int(module.norm_target == "factor_rows"),
                         allora_eta=module.allora_eta, allora_power=module.norm_power)
    return build_adapter_optimizer(model, optim, lr=lr, weight_decay=weight_decay, adapter_groups=[group],
                                   mixin=ALLoRAFactorRowsMixin, optim_args=optim_args, **options)
