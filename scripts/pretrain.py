#!/usr/bin/env python
"""Pretrain a LLaMA-style model from a config with any memtrain or HF optimizer.

    python scripts/pretrain.py --optim swan
    python scripts/pretrain.py configs/pretrain/tiny.yaml --max_steps 50
    accelerate launch scripts/pretrain.py --optim adamw

Every HF TrainingArguments flag works, plus --model, --dataset, --tokenizer, --seq_len, ... (see --help).
"""
import sys

from memtrain.cli import parse_args
from memtrain.distributed import end_process_group
from memtrain.hf import TrainingArguments
from memtrain.optim import format_optimizers
from memtrain.pretrain import PRETRAIN_DEFAULTS, ModelDataArguments, run


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if "--list_optimizers" in argv:
        print(format_optimizers())
        return
    margs, args = parse_args((ModelDataArguments, TrainingArguments), PRETRAIN_DEFAULTS, argv)
    run(margs, args)
    end_process_group()  # on success only: after an error on one rank, a barrier would wait for the others


if __name__ == "__main__":
    main()
