"""LoRA-Pro (Wang et al., arXiv 2407.18242; docs/adapters/lorapro.md): the LoRA factor updates chosen so that the
low-rank change of ``W_eff`` best approximates a full fine-tuning step. Optimizer-only: the model is plain PEFT LoRA and
saves as such.

``mode="full"`` (default, the paper's AdamW): per adapted pair, the LoRA gradients are mapped to the equivalent
full gradient ``G̃ = s(B h_A + h_B A)`` (the tangent-space projection of the true gradient), Adam runs on G̃ with
**full-size m×n fp32 moments**, and its direction U is mapped back to (ΔA, ΔB) with the Sylvester X.
``mode="efficient"``: the LoRA gradients are replaced by the adjusted ones and AdamW-T runs on A and B with
factor-sized states (memory of plain LoRA). Weight decay in both modes scales A and B by ``√(1 − ηλ)`` each,
so B A shrinks by exactly ``(1 − ηλ)``.

Use as PEFT does (``create_loraplus_optimizer``, ``create_riemannian_optimizer``): a factory wrapping the
chosen optimizer, which keeps updating every other trainable tensor with its own routing.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Literal

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from ..optim.capabilities import engine_refusal
from ..optim.sharding import Rows, local, unsharded
from ..optim.base import FALLBACK, _check_betas, _check_hyper, fp32_view, warn_once
from ..optim.transforms import adam_direction_
from .common import (build_adapter_optimizer, fallback_update_without_decay, lora_layers, make_pair,
                     named_adapter_tensors, pair_group, plain_pair_problem, tensor_group)

METHOD = "lorapro"
#: Engine needs (memtrain.optim.capabilities.engine_refusal): pairs of 2-D factors, so no flat partitions.
CAPABILITIES = {"needs_matrix_shape": True, "deepspeed": False}


def lorapro_grams(A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
    """The fp64 r×r Grams ``BᵀB`` and ``AAᵀ`` of a LoRA pair."""
    A64, B64 = A.double(), B.double()
    return B64.T @ B64, A64 @ A64.T


def lorapro_eigh(gram_b: Tensor, gram_a: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(e_B, Q_B, e_A, Q_A)``: eigendecompositions of the Grams (batched over leading dims), eigenvalues clamped
    at 0 (rounding can make them slightly negative)."""
    eb, qb = torch.linalg.eigh(gram_b)
    ea, qa = torch.linalg.eigh(gram_a)
    return eb.clamp_min(0), qb, ea.clamp_min(0), qa


def lorapro_adjust(A: Tensor, B: Tensor, a: Tensor, b: Tensor, *, scaling: float, delta: float,
                   sylvester: bool, eig: tuple[Tensor, Tensor, Tensor, Tensor] | None = None,
                   row_sum: Callable = lambda t: t) -> tuple[Tensor, Tensor]:
    """LoRA-Pro's closed-form adjusted factor gradients (docs/adapters/lorapro.md, "Math").

    ``A [r, n]``, ``B [m, r]``, and a consistent gradient-like pair ``a [r, n]``, ``b [m, r]`` (true LoRA
    gradients ``s·BᵀG``, ``s·GAᵀ``). Returns ``(h_A, h_B)`` with ``s·(B h_A + h_B A)`` the orthogonal projection of
    G onto the tangent space of the rank-r manifold at BA. With ``sylvester`` the free r×r matrix X is the one
    that keeps (h_A, h_B) closest to (a, b); otherwise X = 0. Every r×r quantity is formed and solved in fp64
    (fp32 Grams of ill-conditioned factors are not numerically SPD); only the r×n and m×r products run in the
    factors' dtype. The m×m projector is never formed. ``eig``: ``lorapro_eigh(*lorapro_grams(A, B))``, if known
    (it depends on A and B only, so one decomposition serves both adjustments of a step, and can be batched).
    Under FSDP2 ``B``/``b`` (and so ``h_B``) may be this rank's rows while ``A``/``a`` are whole: the only sum over
    B's rows, ``Bᵀb``, then goes through ``row_sum`` (an r×r all-reduce), and ``eig`` must come from the
    all-reduced ``BᵀB`` (docs/adapters/lorapro.md, "Distributed").
    """
    dtype = A.dtype
    eb, qb, ea, qa = eig if eig is not None else lorapro_eigh(*lorapro_grams(A, B))
    b_inv = (qb / (eb + delta)) @ qb.T  # (BᵀB + δI)⁻¹
    a_inv = (qa / (ea + delta)) @ qa.T  # (AAᵀ + δI)⁻¹
    inv_s2 = 1.0 / scaling**2
    h_a = inv_s2 * (b_inv.to(dtype) @ a)
    b_perp = b - B @ (b_inv @ row_sum(B.double().T @ b.double())).to(dtype)  # (I − P_B) b
    h_b = inv_s2 * (b_perp @ a_inv.to(dtype))
    if sylvester:
        c = -inv_s2 * (b_inv @ (a.double() @ A.double().T))
        # (BᵀB) X + X (AAᵀ) = C, diagonalised by the two eigenbases.
        x = qb @ ((qb.T @ c @ qa) / (eb[:, None] + ea[None, :]).clamp_min(1e-30)) @ qa.T
        x = x.to(dtype)
        h_a = h_a + x @ A
        h_b = h_b - B @ x
    return h_a, h_b


class LoRAProMixin:
    """Adds LoRA-Pro to a memtrain optimizer for the groups marked ``adapter="lorapro"``."""

    def _update_fn(self, group):
        if group.get("adapter") == METHOD and group.get("lora_pairs") is not None:
            if group["lorapro_mode"] == "full":
                return _no_update  # both factors were updated pairwise in step()
            return functools.partial(fallback_update_without_decay, self)
        return super()._update_fn(group)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group.get("adapter") == METHOD:
                self._group_step(group)
        super().step()
        return loss

    def _group_step(self, group: dict) -> None:
        pairs = [(group["params"][ia], group["params"][ib], s, ia) for ia, ib, s in group.get("lora_pairs") or ()]
        pairs = [p for p in pairs if p[0].grad is not None or p[1].grad is not None]  # else skipped
        splits = []
        for A, B, _, index_a in pairs:
            self._check_pair(group, A, B, index_a)
            splits.append((self._rows(group, A, index_a), self._rows(group, B, index_a + 1)))
        # Under FSDP2 (docs/adapters/lorapro.md, "Distributed") A [r, n] is gathered whole (r×n, small) and B [m, r]
        # stays in row blocks: BᵀB is summed over ranks (r×r). One batched fp64 eigh of all pairs' r×r Grams per rank r
        # (not ~4 tiny calls per pair); each decomposition serves both adjustments of the pair's step.
        factors = [(ra.gather(local(A.detach())), local(B.detach())) for (A, B, _, _), (ra, _) in zip(pairs, splits)]
        eigs: dict[int, tuple] = {}
        by_rank: dict[int, list[int]] = {}
        for i, (A, _) in enumerate(factors):
            by_rank.setdefault(A.shape[0], []).append(i)
        for members in by_rank.values():
            grams = [lorapro_grams(*factors[i]) for i in members]
            gram_b = splits[members[0]][1].sum(torch.stack([g[0] for g in grams]))
            batched = lorapro_eigh(gram_b, torch.stack([g[1] for g in grams]))
            for k, i in enumerate(members):
                eigs[i] = tuple(t[k] for t in batched)
        for i, (A, B, scaling, _) in enumerate(pairs):
            self._pair_step(group, A, B, scaling, eigs[i], factors[i], splits[i])

    def _rows(self, group: dict, p: nn.Parameter, index: int) -> Rows:
        if isinstance(p, DTensor):
            return Rows.of(p, group["names"][index], self._position(group, index))
        return unsharded(p)

    def _check_pair(self, group: dict, A: nn.Parameter, B: nn.Parameter, index_a: int) -> None:
        if A.dim() != 2 or B.dim() != 2:
            raise RuntimeError(
                f"lorapro: the LoRA factors of {group['names'][index_a]!r} arrived flattened "
                f"({A.dim()}-D/{B.dim()}-D), so no (A, B) pair can be formed: "
                + engine_refusal("flat", "lorapro", **CAPABILITIES, alternative="plain LoRA (--adapter lora)"))
        for p in (A, B):
            if p.grad is None:  # abnormal for a plain LoRA layer: treat as zeros, say so once
                message = f"lorapro: {group['names'][index_a]!r}: one LoRA factor has no gradient; using zeros"
                warn_once(_warned, message, message)
                p.grad = torch.zeros_like(p)

    def _pair_step(self, group: dict, A: nn.Parameter, B: nn.Parameter, scaling: float, eig: tuple,
                   factors: tuple, splits: tuple[Rows, Rows]) -> None:
        """One pair. ``A32`` and ``grad_a`` are whole (gathered under FSDP2), ``B32``, ``grad_b`` and the full-size
        moments are this rank's rows of B (and of ``G̃``), so every rank computes its rows of ΔB and the whole ΔA,
        of which it applies its own rows."""
        (ra, rb), (A32, B32) = splits, (f.float() for f in factors)
        grad_a, grad_b = ra.gather(local(A.grad).float()), local(B.grad).float()
        delta, lr, wd = group["lorapro_delta"], group["lr"], group["weight_decay"]
        sylvester = group["lorapro_x_mode"] == "sylvester"
        adjust = functools.partial(lorapro_adjust, scaling=scaling, delta=delta, eig=eig, row_sum=rb.sum)
        if group["lorapro_mode"] == "full":
            h_a, h_b = adjust(A32, B32, grad_a, grad_b, sylvester=False)
            g_full = (B32 @ h_a).add_(h_b @ A32).mul_(scaling)  # the equivalent full gradient, [m, n] (rows of B)
            state = self.state[A]
            if not state:
                state["step"] = 0
                state["exp_avg"] = rb.keep(torch.zeros_like(g_full))
                state["exp_avg_sq"] = rb.keep(torch.zeros_like(g_full))
            state["step"] += 1
            beta1, beta2 = group["betas"]
            u = adam_direction_(g_full, local(state["exp_avg"]), local(state["exp_avg_sq"]), step=state["step"],
                                beta1=beta1, beta2=beta2, eps=group["eps"])
            d_a, d_b = adjust(A32, B32, scaling * rb.sum(B32.T @ u), scaling * (u @ A32.T), sylvester=sylvester)
            with fp32_view(local(A)) as a, fp32_view(local(B)) as b:
                if wd != 0:
                    a.mul_(math.sqrt(1 - lr * wd))
                    b.mul_(math.sqrt(1 - lr * wd))
                a.add_(ra.mine(d_a), alpha=-lr)
                b.add_(d_b, alpha=-lr)
        else:  # efficient: adjusted gradients, then AdamW-T (without its own decay) in the base loop
            h_a, h_b = adjust(A32, B32, grad_a, grad_b, sylvester=sylvester)
            if wd != 0:
                with fp32_view(local(A)) as a, fp32_view(local(B)) as b:
                    a.mul_(math.sqrt(1 - lr * wd))
                    b.mul_(math.sqrt(1 - lr * wd))
            local(A.grad).copy_(ra.mine(h_a))
            local(B.grad).copy_(h_b)


def _no_update(param, grad, state, group, rows) -> None:
    return None


_warned: set[str] = set()  # warn_once's scope: once per process


def lorapro_pairs(model: nn.Module, other_lora_layers: Literal["error", "adamw"] = "error"):
    """The plain-LoRA pairs of ``model`` and the named trainable tensors of LoRA layers that are not plain pairs
    (refused, or routed to AdamW-T with ``other_lora_layers="adamw"``)."""
    pairs, others = [], []
    for name, module, adapter in lora_layers(model):
        problem = plain_pair_problem(module, adapter)
        if problem is None:
            pairs.append(make_pair(name, module, adapter))
            continue
        if other_lora_layers != "adamw":
            raise ValueError(
                f"lorapro: LoRA layer {name!r} (adapter {adapter!r}) cannot be adapted: {problem}. LoRA-Pro's theory "
                "covers plain LoRA Linear layers only; pass other_lora_layers='adamw' to train such layers with "
                "AdamW-T instead."
            )
        tensors = named_adapter_tensors(model, name, module, adapter)
        message = (f"lorapro: {name!r} is not a plain LoRA Linear pair ({problem}); its tensors "
                   f"{[n for n, _ in tensors]} get AdamW-T")
        warn_once(_warned, message, message)
        others += tensors
    if not pairs:
        raise ValueError("lorapro: the model has no trainable plain LoRA Linear layers; wrap it with "
                         "peft.get_peft_model(model, LoraConfig(...)) first")
    return pairs, others


def create_lorapro_optimizer(
    model: nn.Module,
    optim: str = "adamw",
    *,
    lr: float,
    weight_decay: float = 0.0,
    mode: Literal["full", "efficient"] = "full",
    x_mode: Literal["sylvester", "zero"] = "sylvester",
    delta: float = 1e-8,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    other_lora_layers: Literal["error", "adamw"] = "error",
    optim_args: str | None = None,
    **options,
):
    """LoRA-Pro on every plain LoRA pair of ``model``; the registered optimizer ``optim`` (with ``optim_args`` /
    ``options``) on every other trainable tensor. lr and weight decay have no defaults hidden in a class: pass
    them explicitly (HF Trainer's factory route passes neither)."""
    if mode not in ("full", "efficient"):
        raise ValueError(f"lorapro mode must be 'full' or 'efficient', got {mode!r}")
    if x_mode not in ("sylvester", "zero"):
        raise ValueError(f"lorapro x_mode must be 'sylvester' or 'zero', got {x_mode!r}")
    if other_lora_layers not in ("error", "adamw"):
        raise ValueError(f"lorapro other_lora_layers must be 'error' or 'adamw', got {other_lora_layers!r}")
    _check_hyper("delta", delta)
    _check_hyper("eps", eps)
    betas = _check_betas("betas", betas)
    pairs, others = lorapro_pairs(model, other_lora_layers)
    groups = [pair_group(pairs, adapter=METHOD, method=METHOD if mode == "full" else FALLBACK, lorapro_mode=mode,
                         lorapro_x_mode=x_mode, lorapro_delta=float(delta), betas=betas, eps=float(eps))]
    if others:
        groups.append(tensor_group(others, method=FALLBACK, betas=betas, eps=float(eps)))
    return build_adapter_optimizer(model, optim, lr=lr, weight_decay=weight_decay, adapter_groups=groups,
                                   mixin=LoRAProMixin, optim_args=optim_args, **options)


def lorapro_state_bytes(model: nn.Module, mode: str = "full") -> int:
    """The optimizer-state bytes LoRA-Pro keeps for the pairs of ``model``: 8·m·n per pair in full mode, 8 per
    factor element in efficient mode (fp32)."""
    pairs, _ = lorapro_pairs(model, "adamw")
    if mode == "full":
        return sum(8 * p.B.shape[0] * p.A.shape[1] for p in pairs)
    return sum(8 * (p.A.numel() + p.B.numel()) for p in pairs)
