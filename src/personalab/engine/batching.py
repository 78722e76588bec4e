"""Padding token sequences into batches, and length-sorted batch plans."""

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PaddedBatch:
    """``[batch, seq]`` tensors; ``offsets[b]`` is the padded index of row ``b``'s first real token."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    offsets: torch.Tensor

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments of a transformers forward: ids, attention mask and position ids."""
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "position_ids": self.position_ids}


def pad_batch(
    rows: Sequence[Sequence[int]], pad_id: int, side: str = "right", device: torch.device | str = "cpu"
) -> PaddedBatch:
    """Pad ``rows`` of token ids to one length on ``side`` ("left" or "right").

    Position ids count real tokens only, so a left-padded row sees the same positions
    as it would alone.
    """
    if side not in ("left", "right"):
        raise ValueError(f"padding side must be 'left' or 'right', not {side!r}")
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    offsets = torch.zeros(len(rows), dtype=torch.long)
    for b, row in enumerate(rows):
        start = width - len(row) if side == "left" else 0
        ids[b, start : start + len(row)] = torch.as_tensor(list(row), dtype=torch.long)
        mask[b, start : start + len(row)] = 1
        offsets[b] = start
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return PaddedBatch(ids.to(device), mask.to(device), position_ids.to(device), offsets)


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Split indices ``0..n-1`` into batches of similar length, longest first."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, not {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
