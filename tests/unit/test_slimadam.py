"""slimadam: AdamW when uncompressed, the compressed step against a direct transcription, the axis convention,
default rules by role and module kind, rules files, state bytes, and the SNR rules tool."""
import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn

import memtrain
from memtrain.hf.metrics import optimizer_state_bytes
from memtrain.optim.slimadam import choose_rule, rules_from_measurements
from memtrain.optim.slimadam import second_moment_snr

from ..conftest import lm_batch, tiny_llama

@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: intra-op threads only add contention on a shared 2-core runner (pytest -n 2)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)




class Toy(nn.Module):
    """The toy model of docs/optimizers/slimadam.md, Tests: embedding, q/v projections, a norm and an untied head."""

    def __init__(self, bias=False):
        super().__init__()
        torch.manual_seed(0)
        self.wte = nn.Embedding(50, 16)
        self.attn = nn.Module()
        self.attn.q_proj = nn.Linear(16, 16, bias=bias)
        self.attn.v_proj = nn.Linear(16, 16, bias=False)
        self.ln = nn.LayerNorm(16, bias=False)
        self.lm_head = nn.Linear(16, 50, bias=False)

    def get_input_embeddings(self):
        return self.wte

    def get_output_embeddings(self):
        return self.lm_head

    def loss(self, step):
        g = torch.Generator().manual_seed(step)
        ids = torch.randint(0, 50, (4, 8), generator=g)
        h = self.wte(ids)
        h = self.ln(h + self.attn.v_proj(torch.tanh(self.attn.q_proj(h))))
        return nn.functional.cross_entropy(self.lm_head(h).reshape(-1, 50), ids.roll(1, 1).reshape(-1))


HP = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8)


def test_uncompressed_equals_torch_adamw_bitwise():
    ours_model = tiny_llama()
    ref_model = copy.deepcopy(ours_model)
    ours = memtrain.build_optimizer(ours_model, "slimadam", weight_decay=0.1, compress=False, **HP)
    assert all(g["compress_dims"] is None for g in ours.param_groups)
    ref = torch.optim.AdamW([{"params": [p for p in ref_model.parameters() if p.dim() >= 2], "weight_decay": 0.1},
                             {"params": [p for p in ref_model.parameters() if p.dim() < 2], "weight_decay": 0.0}],
                            foreach=False, **HP)
    for step in range(5):
        for m, o in ((ours_model, ours), (ref_model, ref)):
            m(**lm_batch(step)).loss.backward()
            o.step()
            o.zero_grad()
    for (n, a), b in zip(ours_model.named_parameters(), ref_model.parameters()):
        assert torch.equal(a, b), n


def _transcription(model, steps, rules, lr, betas, eps, wd):
    """docs/optimizers/slimadam.md, Update, written out with plain tensor ops (no memtrain helpers)."""
    b1, b2 = betas
    state = {}
    for t in range(1, steps + 1):
        model.zero_grad()
        model.loss(t - 1).backward()
        with torch.no_grad():
            for name, p in model.named_parameters():
                k = rules[name]
                g = p.grad
                m, v = state.get(name, (torch.zeros_like(p), None))
                m = b1 * m + (1 - b1) * g
                s = g * g if k is None else (g * g).mean(dim=k, keepdim=True)
                v = (1 - b2) * s if v is None else b2 * v + (1 - b2) * s
                state[name] = (m, v)
                if p.dim() >= 2:
                    p.mul_(1 - lr * wd)
                p.sub_(lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps))
    return state


def test_default_rules_and_compressed_step_match_a_transcription():
    model = Toy()
    ref = copy.deepcopy(model)
    opt = memtrain.build_optimizer(model, "slimadam", weight_decay=0.1, **HP)
    rules = {n: g["compress_dims"] for g in opt.param_groups for n in g["names"]}
    assert rules == {"wte.weight": (1,), "attn.q_proj.weight": (1,), "attn.v_proj.weight": (0,),
                     "ln.weight": None, "lm_head.weight": (1,)}
    for step in range(5):
        model.loss(step).backward()
        opt.step()
        opt.zero_grad()
    ref_state = _transcription(ref, 5, rules, HP["lr"], HP["betas"], HP["eps"], 0.1)
    shapes = {"wte.weight": (50, 1), "attn.q_proj.weight": (16, 1), "attn.v_proj.weight": (1, 16),
              "ln.weight": (16,), "lm_head.weight": (50, 1)}
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        v = opt.state[p]["exp_avg_sq"]
        assert tuple(v.shape) == shapes[name], name
        torch.testing.assert_close(v, ref_state[name][1], rtol=1e-6, atol=1e-12)


def test_axis_convention_is_pinned():
    w = nn.Parameter(torch.zeros(3, 4))
    for k, grad, expected in [
        ((1,), torch.tensor([[1.0], [2.0], [3.0]]).expand(3, 4), torch.tensor([[1.0], [4.0], [9.0]])),  # rows
        ((0,), torch.tensor([[1.0, 2.0, 3.0, 4.0]]).expand(3, 4), torch.tensor([[1.0, 4.0, 9.0, 16.0]])),  # cols
    ]:
        group = {"params": [w], "role": "matrix", "names": ["x.q_proj.weight" if k == (1,) else "x.v_proj.weight"]}
        opt = memtrain.build_optimizer([group], "slimadam", lr=1e-3, betas=(0.9, 0.999))
        w.grad = grad.contiguous()
        opt.step()
        torch.testing.assert_close(opt.state[w]["exp_avg_sq"], 0.001 * expected)


def test_biases_get_a_full_second_moment():
    model = Toy(bias=True)
    opt = memtrain.build_optimizer(model, "slimadam", **HP)
    model.loss(0).backward()
    opt.step()
    assert opt.state[model.attn.q_proj.bias]["exp_avg_sq"].shape == (16,)
    assert opt.state[model.attn.q_proj.weight]["exp_avg_sq"].shape == (16, 1)


def test_state_bytes_at_scale():  # on tiny LLaMA: tests/optim_table.py's formula, in the contract tests
    q = nn.Parameter(torch.zeros(2048, 2048))
    opt = memtrain.build_optimizer([{"params": [q], "role": "matrix", "names": ["l.q_proj.weight"]}], "slimadam",
                                   lr=1e-3)
    q.grad = torch.ones_like(q)
    opt.step()
    assert optimizer_state_bytes(opt) == 4 * 2048**2 + 4 * 2048


def test_rules_file_overrides_defaults_and_bad_files_fail(tmp_path):
    model = Toy()
    path = tmp_path / "rules.json"
    path.write_text(json.dumps({"attn.q_proj.weight": [0], "wte.weight": None}))
    opt = memtrain.build_optimizer(model, "slimadam", rules_file=str(path), **HP)
    rules = {n: g["compress_dims"] for g in opt.param_groups for n in g["names"]}
    assert rules["attn.q_proj.weight"] == (0,) and rules["wte.weight"] is None and rules["lm_head.weight"] == (1,)
    assert memtrain.parse_optim_args("slimadam", f"rules_file={path}") == {"rules_file": str(path)}
    for bad, match in [({"attn.q_proj.weight": [0, 1]}, "'attn.q_proj.weight' has rule \\[0, 1\\]"),
                       ({"nope.weight": [0]}, "does not have: nope.weight"),
                       ({"ln.weight": [1]}, "'ln.weight' is 1-D")]:
        path.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=match):
            memtrain.build_optimizer(Toy(), "slimadam", rules_file=str(path), **HP)


def test_resume_with_changed_rules_is_refused(tmp_path):
    model = Toy()
    opt = memtrain.build_optimizer(model, "slimadam", **HP)
    model.loss(0).backward()
    opt.step()
    saved = opt.state_dict()
    path = tmp_path / "rules.json"
    # the same group layout with the two matrix rules swapped: q's saved [16, 1] moment no longer fits
    path.write_text(json.dumps({"attn.q_proj.weight": [0], "attn.v_proj.weight": [1]}))
    other = memtrain.build_optimizer(model, "slimadam", rules_file=str(path), **HP)
    with pytest.raises(ValueError, match="q_proj.weight.*rules changed"):
        other.load_state_dict(saved)


def test_snr_and_rule_choice():
    rows_constant = torch.rand(6, 1).add(0.1).expand(6, 5).contiguous()
    assert second_moment_snr(rows_constant, 1) == float("inf")
    assert torch.isfinite(second_moment_snr(rows_constant, 0))
    assert choose_rule({0: float(second_moment_snr(rows_constant, 0)), 1: float("inf")}) == (1,)
    g = torch.Generator().manual_seed(0)
    near_constant = 1 + 0.01 * torch.randn(20, 30, generator=g)
    assert second_moment_snr(near_constant, 0) > 1e3 and second_moment_snr(near_constant, 1) > 1e3
    with_zero_row = torch.cat([torch.zeros(1, 4), torch.ones(2, 4) + torch.rand(2, 4)])
    assert torch.isfinite(second_moment_snr(with_zero_row, 1))  # the all-zero slice is skipped
    assert choose_rule({0: 0.5, 1: 0.9}) is None
    assert rules_from_measurements([{"a": {0: 2.0, 1: 5.0}}, {"a": {0: 4.0, 1: 3.0}, "b": {0: 0.1, 1: 0.2}}]) == \
        {"a": [1], "b": None}  # means 3 vs 4


def test_rules_tool_writes_a_file_slimadam_accepts(tmp_path):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
                                  "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 1,
                                  "max_position_embeddings": 64, "use_cache": False}))
    out = tmp_path / "rules.json"
    from memtrain.cli import main as memtrain_cli

    memtrain_cli(["slimadam-rules", "--model", str(config), "--seq_len", "32", "--batch_size", "4", "--max_steps", "12",
                  "--measure_every", "4", "--skip_steps", "3", "--output", str(out)])
    rules = json.loads(out.read_text())
    assert "model.layers.0.self_attn.q_proj.weight" in rules and "lm_head.weight" in rules
    assert all(v in ([0], [1], None) for v in rules.values())
    assert rules["model.norm.weight"] is None
    assert sum(v is not None for v in rules.values()) >= 3  # high-SNR axes exist in practice
    from memtrain.recipes.models import build_model

    model = build_model(str(config), vocab_size=4096)
    opt = memtrain.build_optimizer(model, "slimadam", lr=1e-3, rules_file=str(out))
    got = {n: g["compress_dims"] for g in opt.param_groups for n in g["names"]}
    assert {n: (list(k) if k else None) for n, k in got.items()} == rules
