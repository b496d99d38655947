"""The baseline and the shared fallback path: bit-identical to torch.optim.AdamW(foreach=False) on fp32."""
import copy

import pytest
import torch

import memtrain
from memtrain.optim.transforms import adam_

from ..conftest import lm_batch, tiny_llama


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adamw_equals_torch_adamw_bitwise(weight_decay):
    ours_model = tiny_llama()
    ref_model = copy.deepcopy(ours_model)
    ours = memtrain.build_optimizer(ours_model, "adamw", lr=3e-3, weight_decay=weight_decay, betas=(0.8, 0.95),
                                    eps=1e-7)
    # Same per-parameter weight decay as our routing (none on vectors).
    decay = [p for p in ref_model.parameters() if p.dim() >= 2]
    no_decay = [p for p in ref_model.parameters() if p.dim() < 2]
    ref = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=3e-3, betas=(0.8, 0.95), eps=1e-7, foreach=False)
    for step in range(8):
        for m, o in ((ours_model, ours), (ref_model, ref)):
            m(**lm_batch(step)).loss.backward()
            o.step()
            o.zero_grad()
    for (name, a), b in zip(ours_model.named_parameters(), ref_model.parameters()):
        assert torch.equal(a, b), name


def test_bf16_parameters_get_fp32_math_rounded_once():
    torch.manual_seed(0)
    start = torch.randn(8, 4).bfloat16()
    grads = [torch.randn(8, 4).bfloat16() for _ in range(3)]
    p = torch.nn.Parameter(start.clone())
    opt = memtrain.build_optimizer([p], "adamw", lr=1e-2)
    for g in grads:
        p.grad = g
        opt.step()
    # Independently: fp32 math from the bf16 weights at each step, rounded to bf16 once per step.
    w_bf16, m, v = start.clone(), torch.zeros(8, 4), torch.zeros(8, 4)
    for t, g in enumerate(grads, 1):
        w = w_bf16.float()
        adam_(w, g.float(), m, v, step=t, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
        w_bf16 = w.bfloat16()
    assert torch.equal(p.detach(), w_bf16)
    assert not torch.equal(p.detach(), start)
    state = opt.state[p]
    assert state["exp_avg"].dtype == torch.float32 and state["exp_avg_sq"].dtype == torch.float32
    assert torch.equal(state["exp_avg"], m) and torch.equal(state["exp_avg_sq"], v)
    assert state["step"] == 3


def test_plain_parameter_lists_are_tagged_by_shape():
    w = torch.nn.Parameter(torch.randn(3, 3))
    b = torch.nn.Parameter(torch.randn(3))
    opt = memtrain.build_optimizer([w, b], "adamw", lr=1e-3)
    assert sorted(g["role"] for g in opt.param_groups) == ["matrix", "vector"]
