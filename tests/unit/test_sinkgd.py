"""``sinkgd`` (docs/optimizers/sinkgd.md): steps equal a straight transcription of its Update, no state on matrices,
options."""
import copy

import pytest
import torch

import memtrain
from memtrain.hf.metrics import optimizer_state_bytes

from ..conftest import lm_batch, tiny_llama


def spec_sinkgd_direction(g, iterations=5, eps=1e-8):
    """docs/optimizers/sinkgd.md, Update, written out: rows to RMS 1, then columns to RMS 1, L times."""
    x = g.clone()
    for _ in range(iterations):
        x = x / torch.clamp(torch.sqrt(torch.mean(x**2, dim=1, keepdim=True)), min=eps)
        x = x / torch.clamp(torch.sqrt(torch.mean(x**2, dim=0, keepdim=True)), min=eps)
    return x


def hidden_matrices(model):
    head = model.get_output_embeddings().weight
    return [mod.weight for mod in model.modules() if isinstance(mod, torch.nn.Linear) and mod.weight is not head]


@pytest.mark.parametrize("iterations", [2])  # the default (5): tests/optim_table.py's reference run
def test_steps_equal_the_spec_transcription(iterations):
    lr, adam_lr, wd = 1e-2, 3e-3, 0.1
    model = tiny_llama()
    ref_model = copy.deepcopy(model)
    opt = memtrain.build_optimizer(model, "sinkgd", lr=lr, weight_decay=wd, adam_lr=adam_lr, iterations=iterations)
    matrices = hidden_matrices(ref_model)
    rest = [p for p in ref_model.parameters() if all(p is not w for w in matrices)]
    ref_adam = torch.optim.AdamW([{"params": [p for p in rest if p.dim() >= 2], "weight_decay": wd},
                                  {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}],
                                 lr=adam_lr, foreach=False)
    for step in range(3):
        for m in (model, ref_model):
            m(**lm_batch(step)).loss.backward()
        opt.step()
        with torch.no_grad():
            for w in matrices:
                w.mul_(1 - lr * wd)
                w.sub_(lr * spec_sinkgd_direction(w.grad, iterations))
        ref_adam.step()
        opt.zero_grad()
        ref_model.zero_grad()
    for (name, a), b in zip(model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)


def test_no_state_on_matrices_and_adamw_state_on_the_rest():
    model = tiny_llama()
    opt = memtrain.build_optimizer(model, "sinkgd", lr=1e-3, adam_lr=2e-2)
    for step in range(3):
        model(**lm_batch(step)).loss.backward()
        opt.step()
        opt.zero_grad()
    matrices = hidden_matrices(model)
    assert all(opt.state[w] == {} for w in matrices)
    non_matrix = sum(p.numel() for p in model.parameters() if all(p is not w for w in matrices))
    assert optimizer_state_bytes(opt) == 8 * non_matrix
    groups = {g["role"]: g for g in opt.param_groups}
    assert groups["matrix"]["method"] == "sinkgd" and groups["matrix"]["lr"] == 1e-3
    assert all(groups[r]["method"] == "adamw" and groups[r]["lr"] == 2e-2 for r in ("embedding", "head", "vector"))
    assert memtrain.optim.get_spec("sinkgd").stateless


def test_conv1d_layout_is_the_transposed_linear_update():
    torch.manual_seed(0)
    w, g = torch.randn(24, 40), torch.randn(24, 40)
    linear = torch.nn.Parameter(w.clone())
    conv = torch.nn.Parameter(w.T.contiguous())
    opt = memtrain.build_optimizer([{"params": [linear], "role": "matrix", "layout": "linear"},
                                    {"params": [conv], "role": "matrix", "layout": "conv1d"}], "sinkgd", lr=0.1)
    linear.grad, conv.grad = g.clone(), g.T.contiguous()
    opt.step()
    torch.testing.assert_close(conv.detach().T, linear.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(linear.detach(), w - 0.1 * spec_sinkgd_direction(g), rtol=1e-6, atol=1e-7)


def test_options_parse():  # bad values: tests/optim_table.py
    assert memtrain.parse_optim_args("sinkgd", "iterations=3,norm_eps=1e-6") == {"iterations": 3, "norm_eps": 1e-6}


def test_flattened_matrix_is_refused_with_the_fix():
    flat = torch.nn.Parameter(torch.randn(64))
    opt = memtrain.build_optimizer([{"params": [flat], "role": "matrix", "names": ["mlp.up_proj.weight"]}],
                                   "sinkgd", lr=1e-3)
    flat.grad = torch.randn(64)
    with pytest.raises(RuntimeError, match=r"mlp\.up_proj\.weight.*FSDP2"):
        opt.step()
