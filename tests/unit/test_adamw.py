"""The baseline and the shared fallback path. Bit-identity with torch.optim.AdamW(foreach=False) on fp32 is the
table's reference run (tests/optim_table.py, test_matches_its_reference_on_tiny_llama[adamw-*])."""
import copy

import torch

import memtrain
from memtrain.optim.transforms import adam_

from ..conftest import lm_batch, tiny_llama


def assert_same_training(ours_model, ours, ref_model, ref, steps):
    """Train both copies on the same batches; every parameter must end bit-identical."""
    for step in range(steps):
        for m, o in ((ours_model, ours), (ref_model, ref)):
            m(**lm_batch(step)).loss.backward()
            o.step()
            o.zero_grad()
    for (name, a), b in zip(ours_model.named_parameters(), ref_model.parameters()):
        assert torch.equal(a, b), name


def test_adam_lr_gives_the_non_matrix_roles_their_own_lr_bitwise():
    """The two-lr baseline of the tuned benchmark: hidden matrices at lr, embedding/head/vectors at adam_lr."""
    ours_model = tiny_llama()
    ref_model = copy.deepcopy(ours_model)
    ours = memtrain.build_optimizer(ours_model, "adamw", lr=3e-3, adam_lr=2e-2, weight_decay=0.1)
    roles = {g["role"]: g["lr"] for g in ours.param_groups}
    assert roles == {"embedding": 2e-2, "head": 2e-2, "vector": 2e-2, "matrix": 3e-3}
    linear = {id(m.weight) for m in ref_model.modules() if isinstance(m, torch.nn.Linear)}
    head = ref_model.get_output_embeddings().weight
    matrices = [p for p in ref_model.parameters() if id(p) in linear and p is not head]
    rest_decay = [p for p in ref_model.parameters() if p.dim() >= 2 and not any(p is q for q in matrices)]
    vectors = [p for p in ref_model.parameters() if p.dim() < 2]
    ref = torch.optim.AdamW([{"params": matrices, "lr": 3e-3, "weight_decay": 0.1},
                             {"params": rest_decay, "lr": 2e-2, "weight_decay": 0.1},
                             {"params": vectors, "lr": 2e-2, "weight_decay": 0.0}], lr=1.0, foreach=False)
    assert_same_training(ours_model, ours, ref_model, ref, steps=4)
    # Layer-wise release keeps the two lrs (the benchmark's adamw-layerwise re-runs the tuned point).
    lw_model, plain_model = tiny_llama(), tiny_llama()
    assert_same_training(lw_model, memtrain.build_optimizer(lw_model, "adamw", lr=3e-3, adam_lr=2e-2, layerwise=True),
                         plain_model, memtrain.build_optimizer(plain_model, "adamw", lr=3e-3, adam_lr=2e-2), steps=3)
    plain = memtrain.build_optimizer(tiny_llama(), "adamw", lr=3e-3)
    assert {g["lr"] for g in plain.param_groups} == {3e-3}


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
