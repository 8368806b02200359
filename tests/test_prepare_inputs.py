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
from data_pipeline import (
    DataConfig,
    check_prepared,
    load_eval_set,
    load_tokenizer,
    prepare_data,
    train_bpe,
)
from data_pipeline.prepare import (
    MIN_EVAL_DOCUMENTS,
    documents_for_a_split_by_document,
    is_eval_document,
)
from data_pipeline.tokenizers import TOKENIZER_FILE
from launch.cli import main as cli_main
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
    everything = cfg_for(tmp_path / "all", [str(inputs)])
    with pytest.raises(UserError, match=r"d\.parquet: no column 'text'.*--skip-bad"):
        prepare_data(everything, SEQ, progress=False)
    everything.skip_bad = True  # the parquet file without the text field is skipped, counted
    m = prepare_data(everything, SEQ, progress=False).manifest
    assert m["documents"] == 16  # 3 x 5 JSONL records and e.txt
    assert m["skipped_records"] == 1 and "d.parquet: no column 'text'" in m["skipped_examples"][0]
    assert m["skipped_other_files"] == 1  # notes.rst
    assert any("notes.rst" in line and "unknown type" in line for line in m["skip_summary"])


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
    with pytest.raises(UserError, match=r"empty\.jsonl is empty \(no text\); remove it"):
        prepare_data(cfg_for(tmp_path, [str(tmp_path / "empty.jsonl")]), SEQ, progress=False)
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(UserError, match="unknown file type"):
        prepare_data(cfg_for(tmp_path, [str(tmp_path / "x.csv")]), SEQ, progress=False)
    with pytest.raises(UserError, match=r"'.*missing\.txt' does not exist"):
        prepare_data(cfg_for(tmp_path, [str(tmp_path / "missing.txt")]), SEQ, progress=False)


def test_a_directory_counts_the_files_it_skips(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        (src / f"{i}.txt").write_text(text(i))
    (src / "blank.txt").write_text("  \n\n")
    (src / "none.jsonl").write_text("")
    (src / "data.csv").write_text("a,b\n")
    (src / "README").write_text("no suffix")
    m = prepare_data(cfg_for(tmp_path, [str(src)]), SEQ, progress=False).manifest
    assert m["documents"] == 3
    assert (m["skipped_empty_files"], m["skipped_other_files"], m["skipped_records"]) == (2, 2, 0)
    empty, other = m["skip_summary"]
    assert "2 empty file(s)" in empty and "blank.txt" in empty and "none.jsonl" in empty
    assert "2 file(s) of unknown type" in other and "data.csv" in other and "README" in other


def stderr_lines(capsys) -> list[str]:
    """The CLI's stderr without the progress bar."""
    lines = capsys.readouterr().err.replace("\r", "\n").splitlines()
    return [line for line in lines if line.strip() and "tokenizing" not in line]


def test_only_empty_files_say_so(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("")
    (src / "b.txt").write_text("\n")
    assert cli_main(["prepare-data", str(src), "--output", str(tmp_path / "out")]) == 1
    err = stderr_lines(capsys)
    assert "skipped 2 empty file(s)" in err[0] and "a.txt" in err[0]
    assert "yielded no document" in err[-1]


def test_skip_counts_come_before_the_failure_line(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.jsonl").write_text("{broken\n" + json.dumps({"text": "tiny"}) + "\n")
    (src / "b.rst").write_text("unknown type")
    args = ["prepare-data", str(src), "--output", str(tmp_path / "out"), "--skip-bad"]
    assert cli_main([*args, "--seq-len", "64"]) == 1
    err = stderr_lines(capsys)
    assert len(err) == 3, err
    assert err[0].startswith("skipped 1 bad record(s) or file(s) (--skip-bad), e.g. ")
    assert "a.jsonl:1" in err[0]
    assert err[1].startswith("skipped 1 file(s) of unknown type") and "b.rst" in err[1]
    assert err[2].startswith("hybridtron prepare-data: error: the train split")


def test_broken_archives_are_named_or_skipped_and_counted(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.jsonl").write_text("".join(json.dumps({"text": text(i)}) + "\n" for i in range(5)))
    whole = gzip.compress((json.dumps({"text": text(7)}) + "\n").encode() * 50)
    (src / "b.jsonl.gz").write_bytes(whole[: len(whole) // 2])  # truncated download
    pq.write_table(pa.table({"body": [text(8)]}), src / "c.parquet")
    (src / "d.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(UserError, match=r"b\.jsonl\.gz: not a valid gzip file.*--skip-bad"):
        prepare_data(cfg_for(tmp_path, [str(src)]), SEQ, progress=False)
    m = prepare_data(cfg_for(tmp_path, [str(src)], skip_bad=True), SEQ, progress=False).manifest
    assert m["documents"] == 5 and m["skipped_records"] == 3
    assert [e.split(": ")[0].rsplit("/", 1)[1] for e in m["skipped_examples"]] == [
        "b.jsonl.gz",
        "c.parquet",
        "d.parquet",
    ]


def test_first_document_is_not_always_held_out():
    for fraction in (0.02, 0.1, 0.3, 0.5):
        assert not is_eval_document(0, fraction)
        for n in (100, 1000, 10_000):  # low discrepancy: the share is right at every size
            held_out = sum(is_eval_document(i, fraction) for i in range(n))
            assert abs(held_out - n * fraction) < 3, (fraction, n, held_out)
    assert documents_for_a_split_by_document(0.02) == MIN_EVAL_DOCUMENTS * 50


def one_text_file(tmp_path: Path, chars: int) -> Path:
    """nanoGPT's input.txt: one file of short lines."""
    lines, n = [], 0
    while n < chars:
        lines.append(
            f"line {len(lines)}: " + " ".join(f"w{(len(lines) * j) % 89}" for j in range(8))
        )
        n += len(lines[-1]) + 1
    file = tmp_path / "input.txt"
    file.write_text(("\n".join(lines) + "\n")[:chars])
    return file


def test_one_big_text_file_is_a_corpus(tmp_path):
    file = one_text_file(tmp_path, 46_507)
    cfg = DataConfig(path=str(tmp_path / "out"), dataset="files", inputs=[str(file)])
    m = prepare_data(cfg, 256, progress=False).manifest
    assert m["documents"] == 1 and m["eval_split"] == "tokens"
    # 46,508 tokens with EOS; eval holds the last 2% (930): 3 samples, train the rest: 177
    assert m["splits"]["eval"] == {"samples": 3, "tokens": 771}
    assert m["splits"]["train"] == {"samples": 177, "tokens": 177 * 257}
    body = file.read_bytes()
    held_out = bytes(load_eval_set(cfg, 10).flatten().tolist())
    assert held_out == body[46_508 - 930 : 46_508 - 930 + 771]  # the tail, from its first token
    two = DataConfig(path=str(tmp_path / "two"), dataset="files", inputs=[str(file)], workers=2)
    for split in ("train", "eval"):  # the cut is the same for any number of workers
        a = json.loads((tmp_path / "out" / split / "index.json").read_text())
        b = json.loads(
            (prepare_data(two, 256, progress=False).path / split / "index.json").read_text()
        )
        assert a["shards"] == b["shards"]


def test_too_little_text_says_how_much_each_split_got(tmp_path):
    file = one_text_file(tmp_path, 5_000)  # 2% of 5,001 tokens: 100, less than a sample of 257
    cfg = DataConfig(path=str(tmp_path / "out"), dataset="files", inputs=[str(file)])
    message = (
        r"the eval split of data.dataset=files has 100 tokens \(the last 100 of 5001 tokens: "
        r"1 document\(s\), fewer than 200, are split by tokens\), less than one sample of 257 "
        r"tokens; use more data, a shorter trainer.seq_len or a larger data.eval_fraction"
    )
    with pytest.raises(UserError, match=message):
        prepare_data(cfg, 256, progress=False)
    cfg.eval_fraction = 0.06  # the fix it suggests works
    assert prepare_data(cfg, 256, progress=False).manifest["splits"]["eval"]["samples"] == 1


def test_enough_documents_are_held_out_whole(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    n = documents_for_a_split_by_document(0.2)  # 20
    lines = [json.dumps({"text": f"<{i}>" + "x" * (i % 7)}) for i in range(n)]
    (src / "few.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    (src / "all.jsonl").write_text("\n".join(lines) + "\n")
    few = prepare_data(cfg_for(tmp_path / "few", [str(src / "few.jsonl")]), 3, progress=False)
    assert few.manifest["eval_split"] == "tokens"
    cfg = cfg_for(tmp_path / "all", [str(src / "all.jsonl")])
    assert prepare_data(cfg, 3, progress=False).manifest["eval_split"] == "documents"
    held_out = bytes(t for t in load_eval_set(cfg, 10**6).flatten().tolist() if t < 256)
    expected = [f"<{i}>" for i in range(n) if is_eval_document(i, 0.2)]
    assert len(expected) == MIN_EVAL_DOCUMENTS and "<0>" not in expected
    found = [tag for tag in (f"<{i}>" for i in range(n)) if tag.encode() in held_out]
    assert found == expected


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
