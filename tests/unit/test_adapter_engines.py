"""Adapters refuse, before training, the engines they would get wrong (docs/distributed.md)."""
from types import SimpleNamespace

import pytest

from memtrain.recipes.finetune import check_engine


def trainer(engine):
    zero_stage = {"zero2": 2, "zero3": 3}.get(engine)
    state = SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=1 if engine == "fsdp1" else 2),
                            deepspeed_plugin=SimpleNamespace(zero_stage=zero_stage))
    return SimpleNamespace(accelerator=SimpleNamespace(state=state), is_fsdp_enabled=engine in ("fsdp1", "fsdp2"),
                           is_deepspeed_enabled=zero_stage is not None)


REFUSED = {
    ("lorapro", "zero2"), ("lorapro", "zero3"), ("lorapro", "fsdp1"),
    ("gradnormlorp", "zero2"), ("gradnormlorp", "zero3"), ("gradnormlorp", "fsdp1"), ("gradnormlorp", "fsdp2"),
    ("allora", "zero3"), ("allora", "fsdp1"),
    ("allora_factor_rows", "zero2"), ("allora_factor_rows", "zero3"), ("allora_factor_rows", "fsdp1"),
}


@pytest.mark.parametrize("engine", ["ddp", "fsdp2", "fsdp1", "zero2", "zero3"])
@pytest.mark.parametrize("case", ["lora", "lorapro", "gradnormlorp", "allora", "allora_factor_rows"])
def test_adapter_engine_matrix(case, engine):
    adapter, options = case.replace("_factor_rows", ""), {"norm_target": "factor_rows"} if "factor" in case else {}
    if (case, engine) in REFUSED:
        with pytest.raises(ValueError, match=f"adapter {adapter!r} (needs each weight's matrix shape|reads each adapted "
                                             "layer whole|is not verified exact)") as e:
            check_engine(trainer(engine), adapter, options)
        assert "DDP" in str(e.value)
    else:
        check_engine(trainer(engine), adapter, options)


MATRIX_METHODS = ("adafactor", "apollo", "apollo_mini", "fira", "galore", "muon", "scale", "sinkgd", "slimadam", "swan")


@pytest.mark.parametrize("engine", ["ddp", "fsdp2", "fsdp1", "zero2", "zero3"])
def test_optimizer_engine_matrix(engine):
    """Memtrain's Trainer refuses the flattening engines for the methods that need the matrix shape (the same rule
    and wording as the adapters', memtrain.optim.capabilities); elementwise methods run everywhere."""
    from memtrain.hf.engines import refuse_flattening_engine
    from memtrain.optim.registry import optimizer_names

    for name in optimizer_names():
        if name in MATRIX_METHODS and engine in ("fsdp1", "zero2", "zero3"):
            with pytest.raises(ValueError, match=f"optimizer {name!r} needs each weight's matrix shape, but "
                                                 f"{'FSDP1' if engine == 'fsdp1' else 'DeepSpeed ZeRO'} hands"):
                refuse_flattening_engine(trainer(engine), name)
        else:
            refuse_flattening_engine(trainer(engine), name)
