"""GradNormLoRP (Huang et al., arXiv 2412.19616; docs/adapters/gradnormlorp.md): a weight-normalised LoRA, ``y = (g/ν) ⊙
(x W0ᵀ + s·(x Aᵀ) Bᵀ) + b`` with ν_i = ‖(W0 + s·B A)_{i,:}‖₂, whose factor gradients go through a GaLore-style low-rank
projected AdamW-HF.

What is PEFT's and what is ours:
* PEFT DoRA (``LoraConfig(use_dora=True)``) provides the parameters (``lora_A``, ``lora_B``,
  ``lora_magnitude_vector`` g), their initialisation, merge/unmerge (``W = diag(g/ν)(W0 + s·B A)``, zero
  inference cost) and the saved format: a GradNormLoRP adapter loads in vanilla PEFT as DoRA.
* Ours: :class:`GradNormLoRPLinear` overrides ``forward`` only. DoRA detaches ν; we differentiate it by default
  (``detach_norm=False``, weight-normalisation semantics), computing ν without forming the m×n ``B A``:
  ``ν_i² = ‖W0_i‖² + 2s⟨B_i, (W0 Aᵀ)_i⟩ + s²·B_i (AAᵀ) B_iᵀ``. ``detach_norm=True`` is exactly PEFT's DoRA.
  ``‖W0_i‖²`` is recomputed in every forward (m·n work, next to the m·n·r of ``W0 Aᵀ``), so it can never go stale
  after PiSSA-style inits or later base-weight loads.
* Ours: the optimizer. A ``[r, n]`` (side 1, left projector ``[r, r_p]``) and B ``[m, r]`` (side 0, right projector
  ``[r_p, r]``) get GaLore's one-sided projected AdamW-HF (docs/optimizers/galore.md: SVD refresh every T steps,
  all-zero/non-finite refreshes deferred, α on the projected direction, decay after the update); g gets plain AdamW-HF.
  Other trainable tensors keep the chosen optimizer.
"""
from __future__ import annotations

import functools
import warnings

import torch
from peft import LoraConfig
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import nn

from ..optim.base import _check_betas, _check_hyper, fp32_view
from ..optim import transforms as T
from ..optim.capabilities import engine_refusal
from .common import (build_adapter_optimizer, lora_layers, make_pair, named_adapter_tensors, tensor_group,
                     unadapted_forward)

METHOD = "gradnormlorp"
#: Engine needs (memtrain.optim.capabilities.engine_refusal): the projection needs each 2-D factor whole (not
#: sharded for FSDP2 yet), and the module reads its whole layer in forward (ν from W0, A and B).
CAPABILITIES = {"needs_matrix_shape": True, "deepspeed": False, "fsdp2": False, "whole_module": True}
NORM_FLOOR = 1e-24  # ν² floor: ν ≥ 1e-12, and no infinite sqrt derivative on an exactly zero row


class GradNormLoRPLinear(LoraLinear):
    """PEFT LoRA ``Linear`` with DoRA's parameters and an exact (or detached) weight-norm forward."""

    def __init__(self, base_layer, adapter_name, config, *, detach_norm: bool = False, **kwargs):
        super().__init__(base_layer, adapter_name, config=config, **kwargs)
        self.detach_norm = bool(detach_norm)

    def weight_norm(self, adapter: str) -> torch.Tensor:
        """ν [m] in ``promote_types(W0.dtype, float32)``, differentiable in A and B unless ``detach_norm``."""
        W0 = self.get_base_layer().weight
        ct = torch.promote_types(W0.dtype, torch.float32)
        w0 = W0.detach().to(ct)
        A = self.lora_A[adapter].weight.to(ct)
        B = self.lora_B[adapter].weight.to(ct)
        s = self.scaling[adapter]
        nu2 = w0.square().sum(dim=1) + 2 * s * (B * (w0 @ A.T)).sum(dim=1) + s * s * ((B @ (A @ A.T)) * B).sum(dim=1)
        nu = nu2.clamp_min(NORM_FLOOR).sqrt()
        return nu.detach() if self.detach_norm else nu

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        unadapted = unadapted_forward(self, x, args, kwargs)
        if unadapted is not None:
            return unadapted
        active = [a for a in self.active_adapters if a in self.lora_A]
        if len(active) > 1:
            raise ValueError("GradNormLoRPLinear supports one active adapter at a time")
        result = self.base_layer(x, *args, **kwargs)
        if not active:
            return result
        adapter = active[0]
        lora_A, lora_B = self.lora_A[adapter], self.lora_B[adapter]
        bias = self.get_base_layer().bias
        base = result - bias if bias is not None else result  # x W0ᵀ; the bias is not rescaled
        x_lora = self.lora_dropout[adapter](self._cast_input_dtype(x, lora_A.weight.dtype))
        pre = base + (lora_B(lora_A(x_lora)) * self.scaling[adapter]).to(base.dtype)
        g = self.lora_magnitude_vector[adapter].weight
        out = (g / self.weight_norm(adapter)).to(pre.dtype) * pre
        return (out + bias if bias is not None else out).to(result.dtype)


def gradnormlorp_config(r: int = 8, lora_alpha: int = 16, target_modules="all-linear",
                        base: LoraConfig | None = None, *, detach_norm: bool = False, **fields) -> LoraConfig:
    """A ``LoraConfig(use_dora=True)`` with ``GradNormLoRPLinear`` registered for ``nn.Linear`` targets."""
    if base is None:
        base = LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=0.0, target_modules=target_modules, **fields)
    base.use_dora = True  # DoRA's magnitude parameter, init, merge and saved format
    base._register_custom_module({nn.Linear: functools.partial(GradNormLoRPLinear, detach_norm=detach_norm)})
    return base


def check_gradnormlorp_model(model: nn.Module, trainable_only: bool = True) -> list:
    """Every LoRA layer must be a ``GradNormLoRPLinear`` with a magnitude vector (raises naming the module); sets
    g := ‖W0_i‖ in fp32 precision where it is still PEFT's initial value, so that step 0 equals the base model."""
    layers = list(lora_layers(model, trainable_only))
    if not layers:
        raise ValueError("gradnormlorp: the model has no trainable LoRA layers")
    for name, module, adapter in layers:
        if not isinstance(module, GradNormLoRPLinear):
            raise ValueError(
                f"gradnormlorp: LoRA layer {name!r} is a {type(module).__name__}, not a GradNormLoRPLinear (a "
                "non-nn.Linear target such as GPT-2's Conv1D, or an adapter loaded without gradnormlorp_config's "
                "custom module)")
        if type(module.get_base_layer()) is not nn.Linear:
            raise ValueError(f"gradnormlorp: {name!r} wraps a {type(module.get_base_layer()).__name__}; only plain "
                             "nn.Linear base layers are supported (quantized weights are packed)")
        if adapter not in module.lora_magnitude_vector:
            raise ValueError(f"gradnormlorp: {name!r} has no lora_magnitude_vector: the config needs use_dora=True")
    return layers


@torch.no_grad()
def init_magnitudes(model: nn.Module) -> None:
    """g := ‖W0_i‖ computed in fp32 (PEFT computes it after casting to the base dtype, off by ~1e-3 in bf16)."""
    for _, module, adapter in check_gradnormlorp_model(model):
        W0 = module.get_base_layer().weight
        g = module.lora_magnitude_vector[adapter].weight
        g.copy_(W0.to(torch.promote_types(W0.dtype, torch.float32)).norm(dim=1))


class GradNormLoRPMixin:
    """Projected AdamW-HF for the groups marked ``adapter="gradnormlorp"``."""

    def _update_fn(self, group):
        if group.get("adapter") == METHOD:
            return functools.partial(_projected_update if group["gnl_project"] else _adamw_hf_update, self)
        return super()._update_fn(group)


#: The projected factors' Adam: torch's lerp for the first moment, ε on the uncorrected √V with the bias correction
#: ``√(1−β2ᵗ)/(1−β1ᵗ)`` (a float power) folded into the direction, decay after the update
#: (docs/adapters/gradnormlorp.md).
PROJECTED_ADAM = T.AdamConvention(corrected_eps=False, decay_after=True, pow_root=True)


def _adamw_hf_update(optimizer, param, grad, state, group, rows) -> None:
    optimizer.adam_step(param, grad, state, group, T.HF, rows)


def _projected_update(optimizer, param, grad, state, group, rows) -> None:
    """GaLore's projected step (docs/optimizers/galore.md, proj_type "std") on one LoRA factor, with no host sync
    (docs/registry-and-routing.md).

    The projector is refreshed at the factor's first step and every ``update_proj_gap`` steps after. A gradient
    that is all zero (A of a fresh adapter: B = 0 makes ∇A ≡ 0 at step 1) or non-finite has no subspace: P is kept,
    and a factor with no projector yet (P = 0) makes no update at all (weight, moments and decay untouched); its
    refresh is retried once, at its second step. Decided on the device with ``torch.where``: the SVD runs on zeros
    instead of a bad gradient and its basis is discarded, so nothing reads a value on the host. ``step`` counts every
    step (a skipped one too) and ``refreshes`` every scheduled refresh."""
    engine = "flat" if param.dim() != 2 else "fsdp2" if rows.sharded else None  # the SVD needs the whole factor
    if engine:
        raise RuntimeError(engine_refusal(engine, METHOD, **CAPABILITIES, alternative="plain LoRA (--adapter lora)"))
    g = grad.float()
    m, n = g.shape
    side = T.projector_side(m, n)
    rank = min(group["proj_rank"], m, n)
    if not state:  # every entry at its final shape from the first step; a zero projector means "no subspace yet"
        moments = (m, rank) if side == 0 else (rank, n)
        state.update(step=0, side=side, refreshes=0, projector=g.new_zeros((rank, n) if side == 0 else (m, rank)),
                     exp_avg=g.new_zeros(moments), exp_avg_sq=g.new_zeros(moments))
    P = state["projector"]
    scheduled = state["step"] % group["update_proj_gap"] == 0
    if scheduled or state["step"] == 1:
        ok = torch.isfinite(g).all() & g.ne(0).any()
        g = torch.where(ok, g, torch.zeros((), dtype=g.dtype, device=g.device))
        take = ok if scheduled else ok & ~P.ne(0).any()  # the retry only fills a projector that is still empty
        P.copy_(torch.where(take, T.svd_basis(g, rank, side), P))
        state["refreshes"] += int(scheduled)
    live = P.ne(0).any()  # False: no projector yet, so R, the moments' update and D are all zero
    R = T.project(g, P, side)
    state["step"] += 1
    beta1, beta2 = group["betas"]
    N = T.adam_direction_(R, state["exp_avg"], state["exp_avg_sq"], step=state["step"], beta1=beta1, beta2=beta2,
                          eps=group["eps"], convention=PROJECTED_ADAM)
    N = N * T.hf_step_size(1.0, state["step"], beta1, beta2, pow_root=PROJECTED_ADAM.pow_root)
    D = T.project_back(N, P, side).mul_(group["proj_scale"])
    with fp32_view(param) as p:
        T.descend_(p, D, lr=group["lr"], weight_decay=0.0)
        if group["weight_decay"] != 0:  # decay after the update; ``live`` switches it off without a host branch
            p.add_(p * live, alpha=-group["lr"] * group["weight_decay"])


def create_gradnormlorp_optimizer(
    model: nn.Module,
    optim: str = "adamw",
    *,
    lr: float,
    weight_decay: float = 0.0,
    proj_rank: int | None = None,
    update_proj_gap: int = 200,
    proj_scale: float = 1.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-6,
    optim_args: str | None = None,
    **options,
):
    """Projected AdamW-HF on each GradNormLoRP pair's A and B (rank ``proj_rank``, default the LoRA rank r),
    AdamW-HF on the magnitudes, the registered optimizer ``optim`` on every other trainable tensor."""
    layers = check_gradnormlorp_model(model)
    if proj_rank is not None and (not isinstance(proj_rank, int) or proj_rank < 1):
        raise ValueError(f"gradnormlorp proj_rank must be a positive int, got {proj_rank!r}")
    if not isinstance(update_proj_gap, int) or update_proj_gap < 1:
        raise ValueError(f"gradnormlorp update_proj_gap must be a positive int, got {update_proj_gap!r}")
    _check_hyper("proj_scale", proj_scale)
    _check_hyper("eps", eps)
    betas = _check_betas("betas", betas)
    factors, magnitudes, ranks = [], [], set()
    for name, module, adapter in layers:
        pair = make_pair(name, module, adapter)
        ranks.add(pair.A.shape[0])
        factors += [(f"{name}.lora_A.{adapter}.weight", pair.A), (f"{name}.lora_B.{adapter}.weight", pair.B)]
        taken = {id(pair.A), id(pair.B)}
        magnitudes += [t for t in named_adapter_tensors(model, name, module, adapter) if id(t[1]) not in taken]
    if proj_rank is None:
        if len(ranks) > 1:
            raise ValueError(f"gradnormlorp: the LoRA layers have different ranks {sorted(ranks)}; pass proj_rank")
        proj_rank = ranks.pop()
    elif proj_rank < max(ranks):
        warnings.warn(f"gradnormlorp proj_rank={proj_rank} < r: rank(BA) is capped at proj_rank within each "
                      "projection window (an ablation; docs/adapters/gradnormlorp.md)", stacklevel=2)
    common = dict(adapter=METHOD, method=METHOD, betas=betas, eps=float(eps))
    groups = [tensor_group(factors, gnl_project=1, proj_rank=int(proj_rank), update_proj_gap=int(update_proj_gap),
                           proj_scale=float(proj_scale), **common),
              tensor_group(magnitudes, gnl_project=0, **common)]
    return build_adapter_optimizer(model, optim, lr=lr, weight_decay=weight_decay, adapter_groups=groups,
                                   mixin=GradNormLoRPMixin, optim_args=optim_args, **options)


def gradnormlorp_state_bytes(model: nn.Module, proj_rank: int | None = None) -> int:
    """Exact fp32 state bytes after every factor and magnitude has stepped: A ``4(2·r_p·n + r·r_p)``, B
    ``4(2·m·r_p + r_p·r)``, g ``8·m``."""
    total = 0
    for name, module, adapter in check_gradnormlorp_model(model):
        r, n = module.lora_A[adapter].weight.shape
        m = module.lora_B[adapter].weight.shape[0]
        rp = min(proj_rank or r, r)
        total += 4 * (2 * rp * n + r * rp) + 4 * (2 * m * rp + rp * r) + 8 * m
    return total


__all__ = ["GradNormLoRPLinear", "gradnormlorp_config", "check_gradnormlorp_model", "init_magnitudes",
           "create_gradnormlorp_optimizer", "gradnormlorp_state_bytes"]
