#!/usr/bin/env python
"""Fine-tune a local causal LM with a PEFT LoRA adapter (lora, gradnormlorp, lorapro, allora) or fully.

    python scripts/pretrain.py --output_dir out/llama-tiny
    python scripts/finetune.py --model_name_or_path out/llama-tiny --dataset my_text.txt --adapter lorapro --lora_r 8
    python scripts/finetune.py --model_name_or_path out/llama-tiny --adapter allora --adapter_args eta=4 --merge
    python scripts/finetune.py --model_name_or_path out/llama-tiny --benchmark lora gradnormlorp lorapro allora full

Every HF TrainingArguments flag works, plus the data flags of scripts/pretrain.py (--dataset, --tokenizer,
--seq_len, ...; the tokenizer defaults to the model's directory). See --help.
"""
import sys

from memtrain.cli import parse_args
from memtrain.distributed import end_process_group
from memtrain.finetune import FINETUNE_DEFAULTS, FinetuneArguments, benchmark, run
from memtrain.hf import TrainingArguments
from memtrain.optim import format_optimizers


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if "--list_optimizers" in argv:
        print(format_optimizers())
        return
    fargs, args = parse_args((FinetuneArguments, TrainingArguments), FINETUNE_DEFAULTS, argv)
    if fargs.benchmark:
        benchmark(fargs, args, argv)
    else:
        run(fargs, args)
    end_process_group()  # on success only: after an error on one rank, a barrier would wait for the others


if __name__ == "__main__":
    main()
