"""prepare-data over real files: formats, parallel workers, idempotency, bad records, BPE."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstd
from conftest import tiny_config

from arch.registry import UserError
from data_pipeline import DataConfig, check_prepared, load_tokenizer, prepare_data, train_bpe
from data_pipeline.tokenizers import TOKENIZER_FILE
from trainer import Trainer
from trainer import checkpoint as ckpt

SEQ = 15


def text(i: int) -> str:
    return f"document {i}: " + " ".join(f"word{j * i % 97}" for j in range(40))


@pytest.fixture()
def inputs(tmp_path) -> Path:
    """One directory with every supported format, 5 documents each (+1 text file)."""
    src = tmp_path / "src"
    src.mkdir()
    lines = "".join(json.dumps({"text": text(i), "id": i}) + "\n" for i in range(5))
    (src / "a.jsonl").write_text(lines)
    (src / "b.jsonl.gz").write_bytes(gzip.compress(lines.replace("document", "gz").encode()))
    (src / "c.jsonl.zst").write_bytes(zstd.compress(lines.replace("document", "zst").encode()))
    table = pa.table({"body": [text(i + 100) for i in range(5)], "n": list(range(5))})
    pq.write_table(table, src / "d.parquet")
    (src / "e.txt").write_text(text(1000))
    (src / "notes.rst").write_text("not an input format: ignored in directories")
    return src


def cfg_for(tmp_path: Path, inputs: list[str], **kw) -> DataConfig:
    return DataConfig(
        path=str(tmp_path / "out"), dataset="files", inputs=inputs, eval_fraction=0.2, **kw
    )


def test_every_format_is_read(tmp_path, inputs):
    jsonl = prepare_data(cfg_for(tmp_path, [str(inputs / "*.jsonl*")]), SEQ, progress=False)
    assert jsonl.manifest["documents"] == 15
    names = [Path(f["path"]).name for f in jsonl.manifest["fingerprint"]["corpus"]["files"]]
    assert names == ["a.jsonl", "b.jsonl.gz", "c.jsonl.zst"]
    cfg = cfg_for(tmp_path / "pq", [str(inputs / "d.parquet")], text_field="body")
    assert prepare_data(cfg, SEQ, progress=False).manifest["documents"] == 5
    everything = cfg_for(tmp_path / "all", [str(inputs)], skip_bad=True)
    with pytest.raises(UserError, match=r"d\.parquet: no column 'text'"):
        prepare_data(everything, SEQ, progress=False)


def test_workers_give_identical_shards(tmp_path, inputs):
    one = prepare_data(cfg_for(tmp_path / "1", [str(inputs / "*.jsonl*")]), SEQ, progress=False)
    cfg = cfg_for(tmp_path / "2", [str(inputs / "*.jsonl*")], workers=2)
    two = prepare_data(cfg, SEQ, progress=False)
    for split in ("train", "eval"):
        a = json.loads((one.path / split / "index.json").read_text())
        b = json.loads((two.path / split / "index.json").read_text())
        assert a["shards"] == b["shards"]  # same sizes and xxh64 of every shard
    assert one.manifest["splits"] == two.manifest["splits"]


def test_rerun_is_a_no_op_until_the_input_changes(tmp_path, inputs):
    cfg = cfg_for(tmp_path, [str(inputs / "a.jsonl")])
    first = prepare_data(cfg, SEQ, progress=False)
    assert not first.up_to_date
    shard = first.path / "train" / "shard.00000.mds.zstd"
    mtime = shard.stat().st_mtime_ns
    again = prepare_data(cfg, SEQ, progress=False)
    assert again.up_to_date and shard.stat().st_mtime_ns == mtime
    with open(inputs / "a.jsonl", "a") as f:
        f.write(json.dumps({"text": text(99)}) + "\n")
    with pytest.raises(UserError, match="holds other data"):
        prepare_data(cfg, SEQ, progress=False)
    assert prepare_data(cfg, SEQ, overwrite=True, progress=False).manifest["documents"] == 6


def test_bad_records_are_named_or_skipped_and_counted(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    good = json.dumps({"text": text(1)})
    (src / "a.jsonl").write_text(f"{good}\n{{broken\n{good}\n{json.dumps({'other': 1})}\n{good}\n")
    (src / "b.txt").write_bytes(b"\x00\x01\x02binary" * 50)
    cfg = cfg_for(tmp_path, [str(src)])
    with pytest.raises(UserError, match=r"a\.jsonl:2: JSONDecodeError"):
        prepare_data(cfg, SEQ, progress=False)
    assert not (tmp_path / "out").exists()
    with pytest.raises(UserError, match=r"b\.txt: not UTF-8 text"):
        prepare_data(cfg_for(tmp_path, [str(src / "b.txt")]), SEQ, progress=False)
    cfg.skip_bad = True
    cfg.eval_fraction = 0.5
    prepared = prepare_data(cfg, 7, progress=False)
    assert prepared.manifest["documents"] == 3
    assert prepared.manifest["skipped_records"] == 3  # broken JSON, missing field, binary file
    assert any(
        "a.jsonl:4" in e and "no field 'text'" in e for e in prepared.manifest["skipped_examples"]
    )


def test_empty_and_unknown_inputs(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(UserError, match="yielded no document"):
        prepare_data(cfg_for(tmp_path, [str(tmp_path / "empty.jsonl")]), SEQ, progress=False)
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(UserError, match="unknown file type"):
        prepare_data(cfg_for(tmp_path, [str(tmp_path / "x.csv")]), SEQ, progress=False)


def test_bpe_tokenizer_travels_with_data_and_checkpoints(tmp_path):
    file = train_bpe((text(i) for i in range(300)), 400, tmp_path / "tok")
    data = DataConfig(path=str(tmp_path / "data"), tokenizer="hf", tokenizer_path=str(file.parent),
                      max_bytes=60_000)  # fmt: skip
    prepared = prepare_data(data, 32, progress=False)
    assert (prepared.path / TOKENIZER_FILE).exists()
    assert prepared.manifest["vocab_size"] == 400

    cfg = tiny_config(tmp_path / "run", prepared.path, max_steps=2)
    cfg.data.tokenizer, cfg.model.vocab_size = "hf", 400  # tokenizer_path unset: the data's copy
    Trainer(cfg).fit()
    checkpoint = ckpt.find_latest_checkpoint(tmp_path / "run" / "checkpoints")
    tok = load_tokenizer("hf", str(checkpoint.path))
    assert tok.decode(tok.encode("def main(): return 42")) == "def main(): return 42"

    other = DataConfig(path=str(prepared.path), tokenizer="byte")
    with pytest.raises(UserError, match="tokenized with 'hf'"):
        check_prepared(other, 32, 512)
    retrained = train_bpe((text(i) for i in range(50)), 350, tmp_path / "tok2")
    mismatched = DataConfig(path=str(prepared.path), tokenizer="hf", tokenizer_path=str(retrained))
    with pytest.raises(UserError, match="tokenized with 'hf'"):
        check_prepared(mismatched, 32, 512)


def test_hugging_face_tokenizer_directory_names_its_end_token(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "</s>"])
    tok.train_from_iterator([text(i) for i in range(100)], trainer=trainer)
    directory = tmp_path / "llama-like"
    directory.mkdir()
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    loaded = load_tokenizer("hf", str(directory))
    assert loaded.eos_id == tok.token_to_id("</s>")
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eot>"}))
    with pytest.raises(UserError, match="no '<eot>' token"):
        load_tokenizer("hf", str(directory))
