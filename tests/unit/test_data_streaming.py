"""Streaming pretraining data and token shards (memtrain/recipes/data/{streaming,shards}.py, docs/data.md).

Local JSONL/Parquet sources go through ``datasets.load_dataset(..., streaming=True)``, the code path Hub datasets
take; nothing touches the network.
"""
from __future__ import annotations

import collections
import json
import random

import datasets
import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, default_data_collator

from memtrain.hf import Trainer, TrainingArguments
from memtrain.recipes import data as D

SEQ = 16
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron".split()


def _rows(n=90, seed=0):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        text = f"doc{i} " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 70)))
        rows.append({"text": text if i % 17 else "   ", "id": i})  # a few blank documents, which are dropped
    return rows


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    rows = _rows()
    (root / "docs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, rows


@pytest.fixture(scope="module")
def tok(corpus):
    root, rows = corpus
    return D.get_tokenizer(None, [r["text"] for r in rows], vocab_size=300, cache_dir=root / "cache")


def _stream(corpus, tok, **kw):
    root, _ = corpus
    docs = D.open_document_stream(str(root / "docs.jsonl"))
    kw = {"seed": 5, "window_docs": 4, "shuffle_buffer": 16, "loop": False, **kw}
    return D.PackedStream(docs, tok, SEQ, **kw)


def _blocks(iterable):
    return [tuple(item["input_ids"].tolist()) for item in iterable]


def test_stream_packs_each_window_exactly(corpus, tok):
    """Source order (no shuffle), one consumer: window j is docs [4j, 4j+4) tokenized with EOS after each and cut
    into SEQ blocks, the remainder dropped; labels equal input_ids."""
    _, rows = corpus
    stream = _stream(corpus, tok, shuffle_buffer=0)
    items = list(stream)
    assert all(torch.equal(x["input_ids"], x["labels"]) and x["input_ids"].dtype == torch.int64 for x in items)
    expected = []
    for j in range(0, len(rows), 4):
        flat = []
        for r in rows[j:j + 4]:
            if r["text"].strip():
                flat += tok(r["text"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        expected += [tuple(flat[k:k + SEQ]) for k in range(0, len(flat) // SEQ * SEQ, SEQ)]
    assert _blocks(items) == expected and len(expected) > 50


def test_two_ranks_two_workers_are_disjoint_and_cover_the_single_process_stream(corpus, tok):
    single = _blocks(_stream(corpus, tok))
    assert _blocks(_stream(corpus, tok)) == single  # deterministic for a seed
    assert _blocks(_stream(corpus, tok, seed=6)) != single
    parts = []
    for rank in range(2):
        # Each DataLoader worker is a consumer of its own: rank * 2 + worker of 4.
        loader = torch.utils.data.DataLoader(_stream(corpus, tok, rank=rank, world_size=2), batch_size=None,
                                             num_workers=2)
        parts.append(_blocks(loader))
    # Simulate the same 4 consumers in-process and check which windows each took.
    windows = []
    for c in range(4):
        s = _stream(corpus, tok, rank=c // 2, world_size=2)
        s._worker = lambda c=c: (c % 2, 2)
        windows.append(_blocks(s))
    assert collections.Counter(parts[0] + parts[1]) == collections.Counter(single)  # union, nothing twice
    assert sorted(parts[0]) == sorted(windows[0] + windows[1]) and sorted(parts[1]) == sorted(windows[2] + windows[3])
    assert all(w for w in windows) and not set(windows[0]) & set(windows[3])
    # Consumer c's blocks are the single-process stream's blocks of windows c, c + 4, ...: interleaving the four
    # consumers window by window rebuilds the single-process order.
    one = _stream(corpus, tok)
    per_window = collections.defaultdict(list)
    docs = one.epoch_documents(0)
    for j, texts in enumerate(D.streaming._iter_windows(docs, 4)):
        per_window[j] = [tuple(b) for b in D.cut_blocks(D.tokenize_flat(tok, texts), SEQ).tolist()]
    assert [b for j in sorted(per_window) for b in per_window[j]] == single
    for c in range(4):
        assert windows[c] == [b for j in sorted(per_window) if j % 4 == c for b in per_window[j]]


def test_stream_loops_over_epochs_with_a_new_shuffle(corpus, tok):
    one_epoch = _blocks(_stream(corpus, tok))
    looping = iter(_stream(corpus, tok, loop=True))
    first = [tuple(next(looping)["input_ids"].tolist()) for _ in range(len(one_epoch))]
    second = [tuple(next(looping)["input_ids"].tolist()) for _ in range(len(one_epoch) // 2)]
    assert first == one_epoch and second != one_epoch[: len(second)]
    with pytest.raises(ValueError, match="got no block in a whole epoch"):
        next(iter(_stream(corpus, tok, loop=True, rank=7, world_size=8, window_docs=64)))


def test_parquet_and_jsonl_stream_the_same_documents(corpus, tmp_path):
    _, rows = corpus
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "docs.parquet"))
    from_parquet = [r["text"] for r in D.open_document_stream(str(tmp_path / "docs.parquet"))]
    from_jsonl = [r["text"] for r in D.open_document_stream(str(corpus[0] / "docs.jsonl"))]
    assert from_parquet == from_jsonl == [r["text"] for r in rows]
    assert isinstance(D.open_document_stream(str(tmp_path / "docs.parquet")), datasets.IterableDataset)
    with pytest.raises(ValueError, match="no column 'body'"):
        D.open_document_stream(str(tmp_path / "docs.parquet"), text_column="body")


def test_build_lm_data_streaming_holds_out_the_head(corpus):
    root, rows = corpus
    lm = D.build_lm_data(str(root / "docs.jsonl"), seq_len=SEQ, vocab_size=300, streaming=True, max_eval_samples=6,
                         window_docs=4, shuffle_buffer=0, seed=0, cache_dir=root / "cache",
                         tokenizer_sample_bytes=4000)
    assert lm.mode == "stream" and len(lm.eval) == 6 and "streamed" in lm.summary()
    tok, skip = lm.tokenizer, lm.train.skip_docs
    head = [r["text"] for r in rows[:skip] if r["text"].strip()]
    flat = D.tokenize_flat(tok, head)
    assert len(flat) >= 6 * SEQ and len(D.tokenize_flat(tok, head[:-1])) < 6 * SEQ  # the fewest documents
    assert lm.eval[:]["input_ids"] == D.cut_blocks(flat, SEQ)[:6].tolist()
    lm.train.loop = False
    trained_text = tok.decode([t for b in _blocks(lm.train) for t in b])
    assert not any(f"doc{i} " in trained_text for i in range(skip))  # never trained on
    with pytest.raises(ValueError, match="max_steps"):
        D.build_lm_data(str(root / "docs.jsonl"), streaming=True, max_train_samples=3, cache_dir=root / "cache")


# ------------------------------------------------------------------------------------------- resume


class _Recorder(Trainer):
    def training_step(self, model, inputs, num_items_in_batch=None):
        self.seen.append(inputs["input_ids"].clone())
        return super().training_step(model, inputs, num_items_in_batch)


class _Kill(Exception):
    pass


def _train(out, tok, stream, steps, resume=None, kill_at=None):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_attention_heads=2,
                                         num_key_value_heads=1, num_hidden_layers=1, vocab_size=len(tok),
                                         max_position_embeddings=SEQ, use_cache=False))
    args = TrainingArguments(output_dir=str(out), max_steps=steps, per_device_train_batch_size=2,
                             gradient_accumulation_steps=2, save_strategy="steps", save_steps=2, logging_steps=100,
                             dataloader_num_workers=2, use_cpu=True, report_to="none", learning_rate=1e-2, seed=0,
                             final_eval=False, write_report=False, save_only_model=False)
    trainer = _Recorder(model=model, args=args, train_dataset=stream, data_collator=default_data_collator)
    trainer.seen = []
    D.attach_stream(trainer, stream, resume_from_checkpoint=resume)
    if kill_at is not None:
        class Kill(__import__("transformers").TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                if state.global_step == kill_at:
                    raise _Kill
        trainer.add_callback(Kill())
        with pytest.raises(_Kill):
            trainer.train()
    else:
        trainer.train(resume_from_checkpoint=resume)
    return trainer


def test_kill_and_resume_continues_with_the_exact_next_block(corpus, tok, tmp_path):
    """Real Trainer, 2 dataloader workers, gradient accumulation 2: killed after step 5 (checkpoint at step 4),
    resumed; every batch after the checkpoint is bit-equal to the uninterrupted run's, and so are the weights."""
    full = _train(tmp_path / "full", tok, _stream(corpus, tok, loop=True, window_docs=1), steps=6)
    assert len(full.seen) == 12
    _train(tmp_path / "killed", tok, _stream(corpus, tok, loop=True, window_docs=1), steps=6, kill_at=5)
    checkpoint = tmp_path / "killed" / "checkpoint-4"
    state = json.loads((checkpoint / "stream_state-rank0.json").read_text())
    assert state["consumed_batches"] == 8 and [p[3] for p in state["positions"]] == [8, 8]  # 4 batches × 2 each
    resumed = _train(tmp_path / "killed", tok, _stream(corpus, tok, loop=True, window_docs=1), steps=6, resume=str(checkpoint))
    assert len(resumed.seen) == 4
    # The workers started at their checkpointed windows (no replay of the consumed part of the stream).
    for w in range(2):
        epoch, window, offset, _ = state["positions"][w]
        assert window >= 2 and resumed.train_dataset._ledger[w, 0].tolist() == [epoch, window, 8 - offset]
    for got, want in zip(resumed.seen, full.seen[8:]):
        assert torch.equal(got, want)
    for (name, a), b in zip(full.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), name
    # A different batch size cannot continue the same stream exactly: refused with the reason.
    with pytest.raises(ValueError, match="batch_size"):
        _stream(corpus, tok, loop=True, window_docs=1).load_state(checkpoint, batch_size=3, num_workers=2)


# ------------------------------------------------------------------------------------------- shards


def test_prepare_data_shards_round_trip(corpus, tok, tmp_path):
    root, rows = corpus
    tok.save_pretrained(str(tmp_path / "tok"))
    index = D.prepare_data(str(root / "docs.jsonl"), tmp_path / "shards", tokenizer=str(tmp_path / "tok"),
                           eval_tokens=40, shard_tokens=100, batch_docs=7)
    assert index["dtype"] == "uint16" and index["eos_token_id"] == tok.eos_token_id
    assert index["tokenizer_fingerprint"] == D.tokenizer_fingerprint(tok)
    head = index["source"]["eval_head_documents"]
    eval_flat = D.tokenize_flat(tok, [r["text"] for r in rows[:head] if r["text"].strip()])
    train_flat = D.tokenize_flat(tok, [r["text"] for r in rows[head:] if r["text"].strip()])
    assert len(eval_flat) >= 40 and index["splits"]["train"]["tokens"] == len(train_flat)
    assert len(index["splits"]["train"]["files"]) == -(-len(train_flat) // 100)  # many files of <= 100 tokens

    blocks = D.TokenBlocks(tmp_path / "shards", "train", SEQ)
    assert len(blocks) == len(train_flat) // SEQ
    got = np.concatenate([blocks[i]["input_ids"].numpy() for i in range(len(blocks))])
    assert np.array_equal(got, train_flat[: len(blocks) * SEQ])  # blocks that span two files included
    assert np.array_equal(D.TokenBlocks(tmp_path / "shards", "eval", 8).tokens(0, len(eval_flat)), eval_flat)

    lm = D.build_lm_data(str(tmp_path / "shards"), seq_len=SEQ, max_eval_samples=2)
    assert lm.mode == "shards" and len(lm.train) == len(blocks) and len(lm.eval) == 2
    assert lm.eval[:]["input_ids"] == D.cut_blocks(eval_flat, SEQ)[:2].tolist()
    assert D.tokenizer_fingerprint(lm.tokenizer) == index["tokenizer_fingerprint"]
    assert D.shards.token_dtype(65536) == np.uint16 and D.shards.token_dtype(65537) == np.uint32

    (tmp_path / "shards" / "train-00001.bin").write_bytes(b"\0" * 6)
    with pytest.raises(ValueError, match="damaged"):
        D.TokenBlocks(tmp_path / "shards", "train", SEQ)
    with pytest.raises(FileExistsError):
        D.prepare_data(str(root / "docs.jsonl"), tmp_path / "shards", tokenizer=str(tmp_path / "tok"))


def test_pretrain_job_reads_shards_and_streams_with_resume(corpus, tok, tmp_path):
    """The pretrain job's flags reach the data: shards directory, and --streaming with a checkpoint and a resume."""
    from memtrain.recipes.arguments import parse_args
    from memtrain.recipes.pretrain import PRETRAIN_DEFAULTS, ModelDataArguments, run

    root, _ = corpus
    tok.save_pretrained(str(tmp_path / "tok"))
    D.prepare_data(str(root / "docs.jsonl"), tmp_path / "shards", tokenizer=str(tmp_path / "tok"), eval_tokens=64)
    common = ["--seq_len", str(SEQ), "--per_device_train_batch_size", "2", "--report_to", "none",
              "--save_final_model", "false", "--logging_steps", "100", "--max_eval_samples", "3"]
    report = run(*parse_args((ModelDataArguments, TrainingArguments), PRETRAIN_DEFAULTS, common + [
        "--dataset", str(tmp_path / "shards"), "--max_steps", "2", "--output_dir", str(tmp_path / "a")]))
    assert report["eval_tokens"] == 3 * (SEQ - 1)

    stream = common + ["--dataset", str(root / "docs.jsonl"), "--streaming", "true", "--tokenizer",
                       str(tmp_path / "tok"), "--stream_window_docs", "2", "--output_dir", str(tmp_path / "b"),
                       "--save_strategy", "steps", "--save_steps", "2"]
    run(*parse_args((ModelDataArguments, TrainingArguments), PRETRAIN_DEFAULTS, stream + ["--max_steps", "2"]))
    assert (tmp_path / "b" / "checkpoint-2" / "stream_state-rank0.json").is_file()
    report = run(*parse_args((ModelDataArguments, TrainingArguments), PRETRAIN_DEFAULTS, stream + [
        "--max_steps", "3", "--resume_from_checkpoint", str(tmp_path / "b" / "checkpoint-2")]))
    assert report["global_steps"] == 3 and report["train_tokens"] == 1 * 2 * SEQ  # only the step after the resume
