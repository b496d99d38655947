#!/usr/bin/env python
"""Shim for ``memtrain finetune``, kept so that ``accelerate launch scripts/finetune.py ...`` works from a checkout.
The job lives in memtrain/recipes/finetune.py; ``memtrain finetune --help`` lists its flags."""
from memtrain.recipes.finetune import main

if __name__ == "__main__":
    main()
