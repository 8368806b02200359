"""Mixtures (data.sources): every batch is split among the sources by weight."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import tiny_config

from arch.registry import ConfigError, UserError
from data_pipeline import DataConfig, build_train_loader, load_eval_set, prepare_data
from data_pipeline.config import SourceConfig
from launch.config import load_config
from trainer import Trainer

SEQ = 15


def prepared(tmp_path: Path, letter: str, seq: int = SEQ) -> Path:
    """A data set whose documents are one repeated letter: each sample says where it came from."""
    src = tmp_path / f"{letter}-src"
    src.mkdir()
    for i in range(40):
        (src / f"{i:02d}.txt").write_text(letter * (50 + i))
    out = tmp_path / f"{letter}-{seq}"
    prepare_data(DataConfig(path=str(out), dataset="files", inputs=[str(src)], eval_fraction=0.2),
                 seq, progress=False)  # fmt: skip
    return out


def origin(sample) -> str:
    letters = {chr(t) for t in sample.tolist() if t < 256}
    assert len(letters) == 1
    return letters.pop()


def test_every_batch_follows_the_weights(tmp_path):
    a, b = prepared(tmp_path, "a"), prepared(tmp_path, "b")
    cfg = DataConfig(
        sources=[SourceConfig(path=str(a), weight=3), SourceConfig(path=str(b), weight=1)]
    )
    loader = build_train_loader(cfg, micro_batch_size=4)
    for i, batch in enumerate(loader):
        assert sorted(origin(s) for s in batch) == ["a", "a", "a", "b"]
        if i == 20:
            break
    evaluation = [origin(s) for s in load_eval_set(cfg, 8)]
    assert evaluation.count("a") == 6 and evaluation.count("b") == 2


def test_a_mixture_trains_and_checks_every_source(tmp_path):
    a, b = prepared(tmp_path, "a"), prepared(tmp_path, "b")
    cfg = tiny_config(tmp_path / "run", a, max_steps=3)
    cfg.trainer.seq_len = SEQ
    cfg.data.sources = [SourceConfig(path=str(a), weight=1), SourceConfig(path=str(b), weight=1)]
    assert Trainer(cfg).fit().step == 3
    cfg.data.sources[1] = SourceConfig(path=str(prepared(tmp_path, "c", seq=7)))
    cfg.trainer.run_dir = str(tmp_path / "run2")
    with pytest.raises(UserError, match="prepared for seq_len 7"):
        Trainer(cfg).fit()


def test_weights_must_be_positive():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.sources=[{path: x, weight: 0}]"])
    assert err.value.key == "data.sources.0.weight"
