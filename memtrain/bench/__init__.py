"""Benchmarks: each runs memtrain's jobs in subprocesses and tabulates their reports.

``memtrain bench [...]`` is the optimizer comparison (:mod:`.optimizers`); ``memtrain bench engines`` the optimizer ×
engine table (:mod:`.engines`); ``memtrain bench layerwise`` what layer-wise release saves (:mod:`.layerwise`);
``memtrain bench data`` the data pipeline's throughput and memory (:mod:`.data`); ``memtrain bench step`` the time of
one ``optimizer.step()`` next to reference implementations (:mod:`.step`, measured in its own process, no subprocesses);
``memtrain bench whitening`` where SWAN's matrix update spends its time (:mod:`.whitening`).
The fine-tuning benchmark is ``memtrain finetune --benchmark ...`` (:mod:`.finetune`).
"""
from __future__ import annotations

import importlib

SUBCOMMANDS = {"engines": "memtrain.bench.engines", "layerwise": "memtrain.bench.layerwise",
               "data": "memtrain.bench.data", "step": "memtrain.bench.step",
               "whitening": "memtrain.bench.whitening"}


def main(argv=None):
    argv = list(argv or [])
    if argv and argv[0] in SUBCOMMANDS:
        return importlib.import_module(SUBCOMMANDS[argv[0]]).main(argv[1:])
    return importlib.import_module("memtrain.bench.optimizers").main(argv)
