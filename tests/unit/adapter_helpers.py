"""Shared pieces of the adapter tests: a tiny PEFT model per adapter, training steps, the exact-resume check,
and the merged-vs-adapter logits check."""
from __future__ import annotations


import torch

from memtrain import adapters

from ..conftest import checkpoint_roundtrip, lm_batch, tiny_llama

LR = 5e-3


def peft_tiny(adapter: str, seed: int = 0, r: int = 4, dtype=torch.float32, **options):
    config = adapters.lora_config(adapter, r=r, lora_alpha=2 * r, target_modules="all-linear", **options)
    return adapters.wrap(tiny_llama(seed=seed, dtype=dtype), adapter, config)


def train_steps(model, opt, start: int, n: int, fixed_batch: bool = False) -> list[float]:
    """n steps on batches start, start+1, ... (random tokens), or on batch 0 every time (a loss that can fall)."""
    losses = []
    for s in range(start, start + n):
        loss = model(**lm_batch(0 if fixed_batch else s)).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def assert_resume_exact(adapter: str, k: int = 2, j: int = 2, dtype=torch.float32, **options):
    """k steps, save model + optimizer, fresh model and optimizer, load (weights_only), j steps == k+j steps."""
    module_opts = {o: options.pop(o) for o in list(options) if o in adapters.MODULE_OPTIONS.get(adapter, ())}

    def build():
        model = peft_tiny(adapter, dtype=dtype, **module_opts)
        return model, adapters.create_optimizer(adapter, model, "adamw", lr=LR, weight_decay=0.01, **options)

    ref_model, ref_opt = build()
    train_steps(ref_model, ref_opt, 0, k + j)

    model, opt = build()
    train_steps(model, opt, 0, k)
    saved = checkpoint_roundtrip(model, opt, opt_key='opt')
    model2, opt2 = build()
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    for p, q in zip(opt.state.values(), opt2.state.values()):
        for key, value in p.items():
            if torch.is_tensor(value):
                assert q[key].dtype == value.dtype, key  # state keeps its saved dtype
    train_steps(model2, opt2, k, j)
    for (n1, p1), (n2, p2) in zip(ref_model.named_parameters(), model2.named_parameters()):
        assert n1 == n2
        assert torch.equal(p1, p2), f"{adapter}: {n1} differs after resume"


@torch.no_grad()
def assert_merge_matches(model, atol: float = 1e-5):
    """merge_and_unload() gives a plain model whose logits equal the adapter model's."""
    batch = lm_batch(123)
    model.eval()
    expected = model(input_ids=batch["input_ids"]).logits
    merged = model.merge_and_unload()
    from peft.tuners.tuners_utils import BaseTunerLayer

    assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules())
    got = merged(input_ids=batch["input_ids"]).logits
    torch.testing.assert_close(got, expected, atol=atol, rtol=0)
    return merged
