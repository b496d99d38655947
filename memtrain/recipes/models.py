"""LLaMA-style models built from named configs, or loaded from a saved directory or a Hugging Face Hub id.

Named configs ship with the package in ``memtrain/configs/models/<name>.json``: ``llama-tiny`` (the CPU default), ``llama-20m`` and the standard benchmark sizes
``llama-60m`` … ``llama-7b`` of the GaLore protocol (GaLore, arXiv 2403.03507, App. C): RMSNorm, SwiGLU, rotary
embeddings, untied head, no biases. ``--model`` also accepts a local directory written by ``save_pretrained``
(its weights are loaded), a path to a config ``.json`` (randomly initialised), or a Hub model id such as
``HuggingFaceTB/SmolLM2-135M`` (its weights are loaded: downloaded when online, from the local cache when
``HF_HUB_OFFLINE`` is set; memtrain follows the switch and never sets it).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, PretrainedConfig, PreTrainedModel

from .. import configs
from .data import hub

DEFAULT_MODEL = "llama-tiny"
CONFIG_DIR = configs.MODELS
model_names = configs.model_names


def _accepted() -> str:
    return (f"one of {', '.join(model_names())}, a config .json file, a directory saved with save_pretrained, or a "
            "Hugging Face Hub model id")


def _is_hub_model(model: str) -> bool:
    """Not a named config and not a local path, but shaped like a Hub id."""
    return not (CONFIG_DIR / f"{model}.json").is_file() and not Path(model).exists() and hub.looks_like_hub_id(model)


def _from_hub(load, model: str, **kwargs):
    try:
        return load(model, **kwargs)
    except (OSError, ValueError) as e:
        raise hub.repo_error("model", model, _accepted(), e) from e


def get_model_config(model: str = DEFAULT_MODEL, **overrides) -> PretrainedConfig:
    """The config of a named model, a config .json file, or a saved model directory; ``overrides`` win."""
    path = Path(model)
    if path.is_dir():
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    elif _is_hub_model(model):
        config = _from_hub(AutoConfig.from_pretrained, model)
    else:
        if path.suffix == ".json" and path.is_file():
            text = path.read_text()
        else:
            entry = CONFIG_DIR / f"{model}.json"
            if not entry.is_file():
                raise ValueError(f"unknown model {model!r}: use {_accepted()}")
            text = entry.read_text()
        fields = json.loads(text)
        if fields.get("model_type", "llama") != "llama":
            config = AutoConfig.for_model(**fields)
        else:
            config = LlamaConfig(**fields)
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def build_model(
    model: str = DEFAULT_MODEL,
    *,
    vocab_size: int | None = None,
    special_token_ids: dict[str, int] | None = None,
    dtype: torch.dtype | None = None,
    seed: int | None = None,
) -> PreTrainedModel:
    """A causal LM: loaded with its weights from a saved directory, else randomly initialised from a config.

    ``vocab_size`` (the tokenizer's) replaces the config's for fresh models; a saved model keeps its own and
    must already cover the tokenizer. ``seed`` makes the random initialisation reproducible.
    """
    path = Path(model)
    saved = path.is_dir() and (any(path.glob("*.safetensors")) or any(path.glob("*.bin")))
    if saved or _is_hub_model(model):
        if saved:
            loaded = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)
        else:
            loaded = _from_hub(AutoModelForCausalLM.from_pretrained, model, dtype=dtype)
        if vocab_size is not None and vocab_size > loaded.config.vocab_size:
            raise ValueError(
                f"the tokenizer has {vocab_size} tokens but the saved model {model!r} only {loaded.config.vocab_size}; "
                "use the tokenizer saved with the model (--tokenizer the model's directory)"
            )
        return loaded
    overrides = dict(special_token_ids or {})
    if vocab_size is not None:
        overrides["vocab_size"] = vocab_size
    config = get_model_config(model, **overrides)
    if seed is not None:
        torch.manual_seed(seed)
    built = AutoModelForCausalLM.from_config(config)
    return built.to(dtype) if dtype is not None else built


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
