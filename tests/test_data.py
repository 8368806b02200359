"""Data pipeline: corpus -> MDS shards, the streaming train loader (epochs, mid-epoch resume),
the eval set, the manifest checks, and integrity of the shards.

The session fixture `tiny_data` is shared with other test files and is only ever read through a
copy here: streaming writes decompressed shards next to the compressed ones when it reads them.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY_SEQ_LEN

from arch.registry import UserError
from data_pipeline import (
    DataConfig,
    build_train_loader,
    check_prepared,
    load_eval_set,
    prepare_data,
    read_manifest,
)
from data_pipeline.corpora import StdlibCorpus
from data_pipeline.prepare import (
    MANIFEST,
    documents_for_a_split_by_document,
    eval_tail_tokens,
    is_eval_document,
)
from data_pipeline.sources import IngestReport
from data_pipeline.tokenizers import ByteTokenizer

SAMPLE_LEN = TINY_SEQ_LEN + 1
TINY_MAX_BYTES = 60_000  # what conftest's `tiny_data` was prepared with


def expected_samples(docs, eval_fraction: float, sample_len: int) -> dict[str, torch.Tensor]:
    """Rebuild both splits by hand: each document's bytes + EOS, per split (whole documents, or
    the tail of the token stream for a corpus of few documents), cut into samples."""
    tok = ByteTokenizer()
    docs = [[*text.encode("utf-8"), tok.eos_id] for text in docs]
    streams: dict[str, list[int]] = {"train": [], "eval": []}
    if len(docs) >= documents_for_a_split_by_document(eval_fraction):
        for index, ids in enumerate(docs):
            streams["eval" if is_eval_document(index, eval_fraction) else "train"] += ids
    else:
        stream = [t for ids in docs for t in ids]
        cut = len(stream) - eval_tail_tokens(len(stream), eval_fraction)
        streams = {"train": stream[:cut], "eval": stream[cut:]}
    out = {}
    for split, ids in streams.items():
        n = len(ids) // sample_len
        out[split] = torch.tensor(ids[: n * sample_len], dtype=torch.int64).view(n, sample_len)
    return out


def read_split_in_order(path: Path, micro_batch: int = 1) -> torch.Tensor:
    loader = build_train_loader(DataConfig(path=str(path), shuffle=False), micro_batch)
    return torch.cat(list(loader))


def fresh_copy(src: Path, dst: Path) -> Path:
    """A copy of a prepared directory as prepare_data left it (compressed shards only)."""
    shutil.copytree(src, dst)
    for raw in dst.rglob("*.mds"):  # decompressed by an earlier reader
        raw.unlink()
    return dst


@pytest.fixture(scope="module")
def data(tiny_data, tmp_path_factory) -> Path:
    """A private copy of the shared tiny_data directory."""
    return fresh_copy(tiny_data, tmp_path_factory.mktemp("data-copy") / "stdlib-tiny")


@pytest.fixture(scope="module")
def expected() -> dict[str, torch.Tensor]:
    docs = stdlib_docs(TINY_MAX_BYTES)
    return expected_samples(docs, DataConfig().eval_fraction, SAMPLE_LEN)


def rows(batches) -> list[tuple[int, ...]]:
    return [tuple(r.tolist()) for b in batches for r in b]


# ---- prepare_data --------------------------------------------------------------------------------


def test_prepared_layout_and_manifest(data, expected):
    manifest = read_manifest(data)
    assert manifest["seq_len"] == TINY_SEQ_LEN
    assert manifest["tokenizer"] == "byte" and manifest["vocab_size"] == 257
    assert json.loads((data / MANIFEST).read_text()) == manifest
    for split in ("train", "eval"):
        index = json.loads((data / split / "index.json").read_text())
        assert index["shards"], split
        total = 0
        for shard in index["shards"]:
            assert shard["format"] == "mds" and shard["compression"] == "zstd"
            assert "xxh64" in shard["zip_data"]["hashes"]
            assert (data / split / shard["zip_data"]["basename"]).is_file()
            assert shard["zip_data"]["basename"].endswith(".zstd")
            total += shard["samples"]
        stats = manifest["splits"][split]
        assert total == stats["samples"] == len(expected[split]) > 0
        assert stats["tokens"] == stats["samples"] * SAMPLE_LEN
    assert len(json.loads((data / "train" / "index.json").read_text())["shards"]) > 1


def test_splits_hold_the_corpus_token_for_token(data, expected):
    """Train samples in order are the non-eval documents + EOS, concatenated and cut."""
    train = read_split_in_order(data)
    assert train.dtype == torch.int64 and train.shape == (len(expected["train"]), SAMPLE_LEN)
    assert torch.equal(train, expected["train"])
    assert torch.equal(load_eval_set(DataConfig(path=str(data)), 10**6), expected["eval"])
    # Documents end with EOS, and the decoded text is the corpus text.
    tok = ByteTokenizer()
    assert (train == tok.eos_id).any()
    docs = list(stdlib_docs(TINY_MAX_BYTES))
    assert len(docs) < documents_for_a_split_by_document(DataConfig().eval_fraction)
    assert read_manifest(data)["eval_split"] == "tokens"  # too few documents: eval is the tail
    eval_text = tok.decode(load_eval_set(DataConfig(path=str(data)), 10**6).flatten().tolist())
    assert eval_text[:500] in docs[-1]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def stdlib_docs(max_bytes: int):
    return StdlibCorpus().documents(DataConfig(max_bytes=max_bytes), IngestReport())


def doc(tag: str, n: int = 300) -> str:
    return (f"<{tag}> " + "lorem ipsum dolor sit amet " * 20)[:n]


def test_text_corpus(tmp_path):
    src = tmp_path / "src"
    docs = [doc("a"), doc("b"), doc("c"), doc("d"), doc("e")]
    write(src / "a.txt", docs[0])
    write(src / "b.md", docs[1])
    write(src / "ignored.rst", "<IGNORED> " * 50)
    write(src / "sub" / "c.txt", docs[2])
    write(src / "sub" / "d.md", docs[3])
    write(src / "z.txt", docs[4])
    cfg = DataConfig(
        path=str(tmp_path / "out"), dataset="files", inputs=[str(src)], eval_fraction=0.3
    )
    prepared = prepare_data(cfg, 15, progress=False)
    assert prepared.manifest["documents"] == 5
    files = prepared.manifest["fingerprint"]["corpus"]["files"]
    assert [Path(f["path"]).name for f in files] == ["a.txt", "b.md", "c.txt", "d.md", "z.txt"]
    exp = expected_samples(docs, 0.3, 16)  # sorted paths: a, b, sub/c, sub/d, z
    assert torch.equal(read_split_in_order(tmp_path / "out"), exp["train"])
    assert torch.equal(load_eval_set(cfg, 10**6), exp["eval"])


def test_jsonl_corpus(tmp_path):
    src = tmp_path / "src"
    docs = [doc(str(i), 120 + 10 * i) for i in range(7)]
    lines = [json.dumps({"text": d, "id": i}) for i, d in enumerate(docs)]
    write(src / "1.jsonl", "\n".join(lines[:4]) + "\n\n   \n")  # blank lines are skipped
    write(src / "2.jsonl", "\n".join(lines[4:]) + "\n")
    write(src / "notes.txt", "not jsonl")  # not matched by the glob
    cfg = DataConfig(
        path=str(tmp_path / "out"),
        dataset="files",
        inputs=[str(src / "*.jsonl")],
        eval_fraction=0.3,
    )
    prepared = prepare_data(cfg, 15, progress=False)
    assert prepared.manifest["documents"] == 7
    exp = expected_samples(docs, 0.3, 16)
    assert torch.equal(read_split_in_order(tmp_path / "out"), exp["train"])
    assert torch.equal(load_eval_set(cfg, 10**6), exp["eval"])


@pytest.mark.parametrize("bad", ["{not json", '{"txt": "no text field"}', '["a list"]'])
def test_bad_jsonl_line_names_file_and_line(tmp_path, bad):
    good = json.dumps({"text": doc("x")})
    file = write(tmp_path / "src" / "data.jsonl", f"{good}\n{good}\n{bad}\n{good}\n")
    out = tmp_path / "out"
    cfg = DataConfig(path=str(out), dataset="files", inputs=[str(file)])
    with pytest.raises(UserError, match=rf"{file}:3\b"):
        prepare_data(cfg, 15, progress=False)
    assert not out.exists() and not (tmp_path / "out.tmp").exists()


def test_missing_or_absent_inputs(tmp_path):
    with pytest.raises(UserError, match="data.inputs"):
        prepare_data(DataConfig(path=str(tmp_path / "o"), dataset="files"), 15, progress=False)
    cfg = DataConfig(path=str(tmp_path / "o"), dataset="files", inputs=[str(tmp_path / "nope")])
    with pytest.raises(UserError, match="'.*nope' does not exist"):
        prepare_data(cfg, 15, progress=False)
    cfg.inputs = [str(tmp_path / "*.jsonl")]
    with pytest.raises(UserError, match="matches no"):
        prepare_data(cfg, 15, progress=False)
    assert not (tmp_path / "o").exists()


def test_existing_directory_needs_overwrite(tmp_path):
    out = tmp_path / "d"
    prepare_data(DataConfig(path=str(out), max_bytes=5_000, eval_fraction=0.3), 15, progress=False)
    before = read_manifest(out)
    cfg = DataConfig(path=str(out), max_bytes=40_000, eval_fraction=0.3)
    with pytest.raises(UserError, match="overwrite"):
        prepare_data(cfg, 15, progress=False)
    assert read_manifest(out) == before
    after = prepare_data(cfg, 15, overwrite=True, progress=False).manifest
    assert read_manifest(out) == after
    assert after["characters"] > before["characters"]
    assert not (tmp_path / "d.tmp").exists()


def split_too_small(tmp_path: Path, split: str) -> DataConfig:
    """Two documents of 40 tokens with EOS: split by tokens, `split` gets less than a sample."""
    src = tmp_path / "src"
    write(src / "0.txt", "a" * 39)
    write(src / "1.txt", "b" * 39)
    fraction = 0.1 if split == "eval" else 0.9  # 8 or 72 of the 80 tokens held out
    return DataConfig(
        path=str(tmp_path / "d"), dataset="files", inputs=[str(src)], eval_fraction=fraction
    )


@pytest.mark.parametrize("split", ["train", "eval"])
def test_failed_preparation_leaves_nothing_behind(tmp_path, split):
    cfg = split_too_small(tmp_path, split)
    edge, fix = ("last", "larger") if split == "eval" else ("first", "smaller")
    message = (
        rf"the {split} split of data.dataset=files has 8 tokens \(the {edge} 8 of "
        rf"80 tokens: 2 document\(s\), fewer than \d+, are split by tokens\), less than one "
        rf"sample of 16 tokens; .* a {fix} data.eval_fraction"
    )
    with pytest.raises(UserError, match=message):
        prepare_data(cfg, 15, progress=False)
    assert not (tmp_path / "d").exists()
    assert not (tmp_path / "d.tmp").exists()


def test_failed_overwrite_keeps_the_old_data(tmp_path):
    cfg = split_too_small(tmp_path, "eval")
    out = Path(cfg.path)
    prepare_data(DataConfig(path=str(out), max_bytes=5_000, eval_fraction=0.3), 15, progress=False)
    before = read_manifest(out)
    with pytest.raises(UserError, match="the eval split"):
        prepare_data(cfg, 15, overwrite=True, progress=False)
    assert read_manifest(out) == before
    assert len(read_split_in_order(out)) == before["splits"]["train"]["samples"]


# ---- the train loader ---------------------------------------------------------------------------


def test_batches_are_int64_and_unshuffled_start_at_the_first_samples(data, expected):
    loader = build_train_loader(DataConfig(path=str(data), shuffle=False), 4)
    batch = next(iter(loader))
    assert batch.dtype == torch.int64
    assert batch.shape == (4, SAMPLE_LEN)
    assert torch.equal(batch, expected["train"][:4])


def test_a_lost_shared_memory_race_is_retried_with_fresh_streams(data, expected, monkeypatch):
    """Two processes opening shards at once can pick the same shared-memory prefix; the loser
    gets FileExistsError and retries. The first attempt here really builds a StreamingDataset
    (which writes its sampling choice into the streams it was given) and then loses the race:
    the retry must still open the split (it once failed with "Streams must provide at most one
    of proportion, repeat, or choose")."""
    import data_pipeline.loader as loader_module

    real = loader_module.TokenDataset
    attempts = []

    def lose_the_first_race(*args, **kwargs):
        attempts.append(kwargs["streams"])
        dataset = real(*args, **kwargs)
        if len(attempts) == 1:
            del dataset
            raise FileExistsError("[Errno 17] File exists: '/000000_locals'")
        return dataset

    monkeypatch.setattr(loader_module, "TokenDataset", lose_the_first_race)
    loader = build_train_loader(DataConfig(path=str(data), shuffle=False), 4)
    assert len(attempts) == 2 and attempts[0][0] is not attempts[1][0]
    assert torch.equal(next(iter(loader)), expected["train"][:4])


def divisor(n: int) -> int:
    return next((b for b in range(3, 9) if n % b == 0), 1)


def test_one_shuffled_epoch_covers_every_sample_once(data, expected):
    n = len(expected["train"])
    b = divisor(n)
    epoch = list(build_train_loader(DataConfig(path=str(data)), b))
    assert len(epoch) == n // b
    assert all(x.shape == (b, SAMPLE_LEN) for x in epoch)
    got = rows(epoch)
    # A multiset comparison: the corpus does hold a few identical samples.
    assert sorted(got) == sorted(rows([expected["train"]]))
    assert got != rows([expected["train"]])  # shuffled


def test_drop_last_leaves_out_only_a_partial_batch(data, expected):
    n = len(expected["train"])
    b = next(b for b in range(3, 12) if n % b)
    epoch = rows(build_train_loader(DataConfig(path=str(data), shuffle=False), b))
    assert epoch == rows([expected["train"][: n // b * b]])


def test_mid_epoch_resume_equals_an_uninterrupted_epoch(data):
    cfg = DataConfig(path=str(data), shuffle=True, shuffle_seed=5)
    full = list(build_train_loader(cfg, 4))

    loader = build_train_loader(cfg, 4)
    it = iter(loader)
    head = [next(it) for _ in range(7)]
    state = loader.state_dict()
    assert state["epoch"] == 0 and state["sample_in_epoch"] == 7 * 4
    del it, loader

    resumed = build_train_loader(cfg, 4)
    resumed.load_state_dict(state)
    tail = list(resumed)
    assert len(head) + len(tail) == len(full)
    assert all(torch.equal(a, b) for a, b in zip(head + tail, full, strict=True))


def test_shuffle_seed_changes_the_order(data):
    a = next(iter(build_train_loader(DataConfig(path=str(data), shuffle_seed=1), 8)))
    b = next(iter(build_train_loader(DataConfig(path=str(data), shuffle_seed=1), 8)))
    c = next(iter(build_train_loader(DataConfig(path=str(data), shuffle_seed=2), 8)))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_loader_on_a_directory_without_shards(tmp_path):
    with pytest.raises(UserError, match="has no index.json"):
        build_train_loader(DataConfig(path=str(tmp_path)), 4)


# ---- eval set, manifest checks --------------------------------------------------------------


def test_eval_set_is_deterministic_and_capped(data, expected):
    cfg = DataConfig(path=str(data))
    a, b = load_eval_set(cfg, 5), load_eval_set(cfg, 5)
    assert a.dtype == torch.int64 and a.shape == (5, SAMPLE_LEN)
    assert torch.equal(a, b)
    n_eval = read_manifest(data)["splits"]["eval"]["samples"]
    everything = load_eval_set(cfg, n_eval + 1000)
    assert everything.shape == (n_eval, SAMPLE_LEN)
    assert torch.equal(everything[:5], a)


def test_check_prepared_accepts_a_matching_run(data):
    manifest = check_prepared(DataConfig(path=str(data)), TINY_SEQ_LEN, 257)
    assert manifest["seq_len"] == TINY_SEQ_LEN
    assert check_prepared(DataConfig(path=str(data)), TINY_SEQ_LEN, 512) == manifest


def test_check_prepared_seq_len_mismatch(data):
    with pytest.raises(UserError, match="seq_len 32.*trainer.seq_len=64.*data.path"):
        check_prepared(DataConfig(path=str(data)), 64, 257)


def test_check_prepared_vocab_too_small(data):
    with pytest.raises(
        UserError, match="257 tokens but model.vocab_size=256; raise model.vocab_size"
    ):
        check_prepared(DataConfig(path=str(data)), TINY_SEQ_LEN, 256)


def test_check_prepared_without_manifest(tmp_path):
    with pytest.raises(UserError, match="run `hybridtron prepare-data data.path="):
        check_prepared(DataConfig(path=str(tmp_path)), TINY_SEQ_LEN, 257)


def test_corrupt_manifest(tmp_path, data):
    copy = shutil.copytree(data, tmp_path / "copy")
    (copy / MANIFEST).write_text("{ truncated")
    with pytest.raises(UserError, match="corrupt.*--overwrite"):
        check_prepared(DataConfig(path=str(copy)), TINY_SEQ_LEN, 257)
    (copy / MANIFEST).write_text(json.dumps({"format": 99}))
    with pytest.raises(UserError, match="format 99"):
        read_manifest(copy)


# ---- shard integrity ----------------------------------------------------------------------------


def corrupt(file: Path) -> None:
    data = bytearray(file.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 8):
        data[i] ^= 0xFF
    file.write_bytes(bytes(data))


def test_corrupted_eval_shard_is_detected(tmp_path, data):
    copy = fresh_copy(data, tmp_path / "copy")
    corrupt(copy / "eval" / "shard.00000.mds.zstd")
    with pytest.raises(Exception) as info:  # noqa: B017  (today: streaming's ValueError)
        load_eval_set(DataConfig(path=str(copy)), 4)
    assert "shard.00000.mds.zstd" in str(info.value)


# Iterates a train loader in a child process: with a corrupt shard, streaming's background
# thread can fail while the main thread waits for that shard, which then waits forever.
TRAIN_EPOCH_SCRIPT = """
import json, os, sys
from arch.registry import UserError
from data_pipeline import DataConfig, build_train_loader
batches, out = 0, {"error": None, "user_error": False, "message": ""}
try:
    loader = build_train_loader(DataConfig(path=sys.argv[1]), 4)
    for _ in range(2):  # the trainer starts another epoch when one yields nothing
        for _ in loader:
            batches += 1
except Exception as exc:
    out = {"error": type(exc).__name__, "user_error": isinstance(exc, UserError), "message": str(exc)}
print(json.dumps({**out, "batches": batches}), flush=True)
os._exit(0)  # streaming's executor threads may still be waiting on the failed shard
"""


def train_epochs_outcome(path: Path) -> dict:
    try:
        proc = subprocess.run(
            [sys.executable, "-c", TRAIN_EPOCH_SCRIPT, str(path)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=30,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("iterating the train loader over a corrupt shard hung")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("split", ["train", "eval"])
def test_corrupted_shard_raises_user_error(tmp_path, data, split):
    copy = fresh_copy(data, tmp_path / "copy")
    corrupt(copy / split / "shard.00000.mds.zstd")
    if split == "train":
        outcome = train_epochs_outcome(copy)
        assert outcome["user_error"], outcome
        assert "shard.00000.mds.zstd" in outcome["message"]
    else:
        with pytest.raises(UserError, match="shard.00000.mds.zstd"):
            load_eval_set(DataConfig(path=str(copy)), 4)


def test_corrupted_decompressed_cache_is_rebuilt_not_trusted(tmp_path, data):
    # Streaming leaves shard.*.mds next to the .zstd after a read and would trust it afterwards.
    copy = fresh_copy(data, tmp_path / "copy")
    cfg = DataConfig(path=str(copy))
    first = load_eval_set(cfg, 1000)
    cached = copy / "eval" / "shard.00000.mds"
    assert cached.exists()
    raw = bytearray(cached.read_bytes())
    raw[-10] ^= 1
    cached.write_bytes(bytes(raw))
    assert torch.equal(load_eval_set(cfg, 1000), first)


def test_missing_shard_is_named(tmp_path, data):
    copy = fresh_copy(data, tmp_path / "copy")
    (copy / "train" / "shard.00000.mds.zstd").unlink()
    with pytest.raises(UserError, match=r"shard\.00000\.mds\.zstd is missing"):
        build_train_loader(DataConfig(path=str(copy)), 4)
