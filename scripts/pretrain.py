#!/usr/bin/env python
"""Shim for ``memtrain pretrain``, kept so that ``accelerate launch scripts/pretrain.py ...`` works from a checkout.
The job lives in memtrain/recipes/pretrain.py; ``memtrain pretrain --help`` lists its flags."""
from memtrain.recipes.pretrain import main

if __name__ == "__main__":
    main()
