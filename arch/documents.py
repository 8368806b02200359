"""Document boundaries inside packed sequences.

Training samples pack several documents, each ended by the tokenizer's end-of-document token.
With ``data.document_masking`` the trainer passes ``doc_ids`` [B, T] to the model; mixers that
take a ``doc_ids`` argument then keep documents apart: attention masks other documents' keys,
Mamba resets its state and conv window where a document starts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def document_ids(input_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Index of the document each position belongs to; an end token closes its own document."""
    is_end = (input_ids == eos_id).long()
    return is_end.cumsum(dim=-1) - is_end


def document_starts(doc_ids: torch.Tensor) -> torch.Tensor:
    """True where a new document begins (not at position 0: nothing comes before it)."""
    return F.pad(doc_ids[..., 1:] != doc_ids[..., :-1], (1, 0), value=False)


def attention_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """[B, 1, T, T] boolean mask: causal and within the same document (True = attend)."""
    t = doc_ids.shape[-1]
    causal = torch.ones(t, t, dtype=torch.bool, device=doc_ids.device).tril()
    same = doc_ids[:, :, None] == doc_ids[:, None, :]
    return (causal & same)[:, None]
