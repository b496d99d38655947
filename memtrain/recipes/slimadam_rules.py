#!/usr/bin/env python
"""Derive SlimAdam compression rules from the second moment's signal-to-noise ratio (docs/optimizers/slimadam.md, The
SNR rules tool).

Runs plain AdamW (fp32 states) on a proxy model, measures for every ≥2-D parameter the SNR of its raw second moment
along each candidate axis at regular steps, averages the SNRs over the measured steps after ``--skip_steps``, and
picks per parameter the axis with the largest SNR above ``--cutoff`` (none: no compression). Writes the JSON rules
file that ``--optim slimadam --optim_args rules_file=PATH`` accepts:

    memtrain slimadam-rules --model llama-tiny --max_steps 300 --output rules/llama-tiny.json

The paper measures over 1000+ steps and drops the first 999; the defaults here are scaled to a CPU-sized run.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

import memtrain
from memtrain.recipes.data import build_lm_data
from memtrain.recipes.models import build_model
from memtrain.optim.slimadam import measure_snr, rules_from_measurements

logger = logging.getLogger("slimadam_rules")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-tiny", help="named config, config .json, or saved model directory")
    p.add_argument("--dataset", default="shakespeare")
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--max_steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.999))
    p.add_argument("--measure_every", type=int, default=25, help="measure at step 1 and every N steps")
    p.add_argument("--skip_steps", type=int, default=100, help="ignore measurements at steps <= this (early V is noise)")
    p.add_argument("--cutoff", type=float, default=1.0, help="an axis qualifies only with SNR above this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", required=True, help="where to write the JSON rules file")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.skip_steps >= args.max_steps:
        raise SystemExit(f"--skip_steps ({args.skip_steps}) must be below --max_steps ({args.max_steps})")
    data = build_lm_data(args.dataset, seq_len=args.seq_len)
    model = build_model(args.model, vocab_size=len(data.tokenizer), seed=args.seed)
    opt = memtrain.build_optimizer(model, "adamw", lr=args.lr, betas=tuple(args.betas))
    ids = torch.tensor(data.train["input_ids"])
    order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(args.seed))
    measurements = []
    for step in range(1, args.max_steps + 1):
        batch = ids[order[((step - 1) * args.batch_size + torch.arange(args.batch_size)) % len(ids)]]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step == 1 or step % args.measure_every == 0) and step > args.skip_steps:
            measurements.append(measure_snr(opt))
            logger.info("step %d: loss %.4f, SNR measured", step, loss.item())
    if not measurements:
        raise SystemExit("no measurement after --skip_steps: lower --skip_steps or --measure_every")
    rules = rules_from_measurements(measurements, args.cutoff)
    # every trainable tensor gets an entry; 1-D ones (norms, biases) are never compressed
    full = {name: rules.get(name) for name, p in model.named_parameters() if p.requires_grad}
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(full, indent=1) + "\n")
    compressed = sum(v is not None for v in full.values())
    logger.info("wrote %s: %d of %d tensors compressed, from %d measurements", out, compressed, len(full),
                len(measurements))
    return full


if __name__ == "__main__":
    main()
