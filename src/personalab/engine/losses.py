"""Losses over the full vocabulary, formed a chunk of positions at a time.

The LM head is applied to ``chunk`` positions at once in float32 and, for positions that
need gradients, recomputed in the backward pass (activation checkpointing of the chunk),
so the logits of a whole batch never sit in memory. Both losses are means over the
selected positions (``mask``, bool ``[batch, seq]``) of ``final hidden states
[batch, seq, hidden]`` (``personalab.engine.forward.final_hidden``).
"""

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from personalab.errors import InvalidInputError


def _kl_sum(student_logits_fn, hs: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    student_logp = F.log_softmax(student_logits_fn(hs).float(), dim=-1)
    return (teacher_logp.exp() * (teacher_logp - student_logp)).sum()


def chunked_kl(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    mask: torch.Tensor,
    student_logits,
    teacher_logits,
    chunk: int = 64,
) -> torch.Tensor:
    """Mean over ``mask`` positions of KL(teacher || student) over the full vocabulary.

    ``*_hidden`` are final hidden states ``[batch, seq, hidden]``, ``mask`` is bool
    ``[batch, seq]``; logits are formed ``chunk`` positions at a time, in float32, and the
    student's are recomputed in backward (activation checkpointing of the chunk).
    """
    hs, ht = student_hidden[mask], teacher_hidden[mask]
    if hs.shape[0] == 0:
        raise InvalidInputError("no response positions in the batch; trajectories need non-empty answers")
    total = hs.new_zeros((), dtype=torch.float32)
    for start in range(0, hs.shape[0], chunk):
        with torch.no_grad():
            teacher_logp = F.log_softmax(teacher_logits(ht[start : start + chunk]).float(), dim=-1)
        part = hs[start : start + chunk]
        if part.requires_grad:
            total = total + checkpoint(_kl_sum, student_logits, part, teacher_logp, use_reentrant=False)
        else:
            total = total + _kl_sum(student_logits, part, teacher_logp)
    return total / hs.shape[0]


def _ce_sum(logits_fn, hs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits_fn(hs).float(), targets, reduction="sum")


def chunked_cross_entropy(
    hidden: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, logits, chunk: int = 64
) -> torch.Tensor:
    """Mean over ``mask`` positions of the cross-entropy of ``targets`` (``[batch, seq]``, the token
    each position predicts) under the logits of ``hidden``."""
    hs, ts = hidden[mask], targets[mask]
    if hs.shape[0] == 0:
        raise InvalidInputError("no response positions in the batch; every record needs an assistant answer")
    total = hs.new_zeros((), dtype=torch.float32)
    for start in range(0, hs.shape[0], chunk):
        part, target = hs[start : start + chunk], ts[start : start + chunk]
        if part.requires_grad:
            total = total + checkpoint(_ce_sum, logits, part, target, use_reentrant=False)
        else:
            total = total + _ce_sum(logits, part, target)
    return total / hs.shape[0]
