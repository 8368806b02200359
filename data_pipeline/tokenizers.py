"""Built-in tokenizers (registry `tokenizer`) and local BPE training.

A tokenizer plugin is a class with ``load(path: str | None)`` (a classmethod building it; ``path``
is ``data.tokenizer_path``), ``vocab_size``, ``eos_id``, ``encode(str) -> list[int]``,
``decode(list[int]) -> str``, ``save(directory)`` (writes the files needed to load it again,
so prepared data and checkpoints carry their tokenizer) and ``fingerprint() -> dict``.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from pathlib import Path

import xxhash

from arch.registry import UserError
from data_pipeline.registries import TOKENIZERS

TOKENIZER_FILE = "tokenizer.json"
HF_TOKENIZER_CONFIG = "tokenizer_config.json"
EOS_TOKEN = "<|endoftext|>"


@TOKENIZERS.register("byte")
class ByteTokenizer:
    """UTF-8 bytes as tokens 0-255 plus an end-of-document token 256; needs no files."""

    vocab_size = 257
    eos_id = 256

    @classmethod
    def load(cls, path: str | None = None) -> ByteTokenizer:
        return cls()

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def save(self, directory: Path) -> None:
        pass

    def fingerprint(self) -> dict:
        return {"name": "byte"}


@TOKENIZERS.register("hf")
class HFTokenizer:
    """A Hugging Face tokenizer: tokenizer.json or its directory (train-tokenizer, or a model's)."""

    def __init__(self, file: Path) -> None:
        from tokenizers import Tokenizer

        try:
            self.tokenizer = Tokenizer.from_file(str(file))
        except Exception as exc:  # the Rust side raises a generic Exception
            raise UserError(f"{file} is not a valid tokenizer.json ({exc})") from None
        self.file = file
        self.vocab_size = self.tokenizer.get_vocab_size()
        eos_token = _hf_eos_token(file.parent) or EOS_TOKEN
        eos = self.tokenizer.token_to_id(eos_token)
        if eos is None:
            raise UserError(
                f"{file} has no {eos_token!r} token to end documents; add one, or name the end "
                f"token as eos_token in tokenizer_config.json beside it"
            )
        self.eos_id = eos

    @classmethod
    def load(cls, path: str | None = None) -> HFTokenizer:
        if not path:
            raise UserError(
                "data.tokenizer=hf needs data.tokenizer_path (tokenizer.json or its directory)"
            )
        file = Path(path)
        if file.is_dir():
            file = file / TOKENIZER_FILE
        if not file.exists():
            raise UserError(
                f"tokenizer file {file} does not exist; run `hybridtron train-tokenizer` first"
            )
        return cls(file)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def save(self, directory: Path) -> None:
        shutil.copyfile(self.file, directory / TOKENIZER_FILE)
        config = self.file.parent / HF_TOKENIZER_CONFIG
        if config.exists():
            shutil.copyfile(config, directory / HF_TOKENIZER_CONFIG)

    def fingerprint(self) -> dict:
        return {
            "name": "hf",
            "xxh64": xxhash.xxh64(self.file.read_bytes()).hexdigest(),
            "eos_id": self.eos_id,
        }


def _hf_eos_token(directory: Path) -> str | None:
    """The end token a Hugging Face tokenizer directory names (e.g. Llama's "</s>"), if any."""
    config = directory / HF_TOKENIZER_CONFIG
    if not config.exists():
        return None
    try:
        eos = json.loads(config.read_text()).get("eos_token")
    except json.JSONDecodeError as exc:
        raise UserError(f"{config} is not valid JSON ({exc})") from None
    if isinstance(eos, dict):  # AddedToken serialised as {"content": ...}
        eos = eos.get("content")
    return eos if isinstance(eos, str) else None


def load_tokenizer(name: str, path: str | None = None):
    """The tokenizer plugin ``name`` loaded from ``path`` (if it needs files)."""
    return TOKENIZERS.get(name).load(path)


def train_bpe(texts: Iterable[str], vocab_size: int, output: Path) -> Path:
    """Train a byte-level BPE tokenizer on ``texts``; writes ``output/tokenizer.json``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 300:
        raise UserError(f"--vocab-size must be at least 300 (256 bytes + merges), got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    output.mkdir(parents=True, exist_ok=True)
    file = output / TOKENIZER_FILE
    tokenizer.save(str(file))
    return file
