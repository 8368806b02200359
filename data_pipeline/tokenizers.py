"""Built-in tokenizers (registry `tokenizer`)."""

from __future__ import annotations

from data_pipeline.registries import TOKENIZERS


@TOKENIZERS.register("byte")
class ByteTokenizer:
    """UTF-8 bytes as tokens 0-255 plus an end-of-document token 256; needs no training."""

    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")
