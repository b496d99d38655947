"""Several Trainer runs in one ``accelerate launch``: start-up, imports and the corpus are paid once.

For each optimizer, a run of ``--max_steps`` that saves a checkpoint half way ("first"; with ``--no_resume`` no
checkpoint), then a run resumed from that checkpoint ("resumed"), both through ``memtrain.recipes.pretrain.run`` exactly
as ``memtrain pretrain`` does, under whatever engine the accelerate config chose. Rank 0 writes
``{name: {"first": report, "resumed": report}}``.

    accelerate launch --config_file memtrain/configs/accelerate/fsdp2.yaml tests/distributed/trainer_resume_worker.py \\
        --out results.json --optims swan,scale --workdir runs -- <pretrain flags shared by every run>
"""
import argparse
import json
from pathlib import Path

import torch.distributed as dist

from memtrain.recipes.arguments import parse_args
from memtrain.hf.engines import enable_cpu_engines
from memtrain.hf import TrainingArguments
from memtrain.recipes.pretrain import PRETRAIN_DEFAULTS, ModelDataArguments, run
from tests.distributed.parity_worker import OPTIONS
from tests.distributed.launch import leave

#: parity_worker's options as optim_args: the same low rank with a projector refresh after the resume point
#: (galore, fira) and quantised moments on the tiny model (adam4bit).
OPTIM_ARGS = {name: ",".join(f"{k}={v}" for k, v in options.items()) for name, options in OPTIONS.items()}
#: ``--optims`` entries may name a variant, ``<optimizer>+<variant>``: layer-wise release, and the same run without
#: it. Both drop the global-norm clipping that layer-wise mode refuses and accumulate 2 micro-batches of half the
#: batch (HF Trainer's no_sync path). Later flags win, so these override the shared ones.
ACCUMULATE = ["--max_grad_norm", "0", "--gradient_accumulation_steps", "2", "--per_device_train_batch_size", "2"]
VARIANTS = {"": [], "layerwise": ACCUMULATE + ["--layerwise"], "standard": ACCUMULATE}


def pretrain(argv: list[str]) -> dict:
    return run(*parse_args((ModelDataArguments, TrainingArguments), PRETRAIN_DEFAULTS, argv))


def main():
    enable_cpu_engines()  # as memtrain's own entry points do
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--optims", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--no_resume", action="store_true", help="only the straight run, without a checkpoint")
    ours, shared = parser.parse_known_args()
    shared = [a for a in shared if a != "--"]
    half = int(shared[shared.index("--max_steps") + 1]) // 2
    results = {}
    for entry in ours.optims.split(","):
        name, _, variant = entry.partition("+")
        out = Path(ours.workdir) / entry
        common = shared + VARIANTS[variant] + ["--optim", name] + (
            ["--optim_args", OPTIM_ARGS[name]] if name in OPTIM_ARGS else [])
        if ours.no_resume:
            results[entry] = {"first": pretrain(common + ["--output_dir", str(out / "first")])}
            continue
        first = pretrain(common + ["--output_dir", str(out / "first"), "--save_strategy", "steps",
                                   "--save_steps", str(half)])
        resumed = pretrain(common + ["--output_dir", str(out / "resumed"),
                                     "--resume_from_checkpoint", str(out / "first" / f"checkpoint-{half}")])
        results[entry] = {"first": first, "resumed": resumed}
    if not dist.is_initialized() or dist.get_rank() == 0:  # the single-process config starts no process group
        Path(ours.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
    leave()
