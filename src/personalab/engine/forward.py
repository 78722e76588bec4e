"""Forward passes that need more than ``capture``: final hidden states for training, the LM head
applied to them, next-token logits for scoring, and the likelihood of given answers.

``final_hidden`` returns ``hidden_states[n_blocks]`` (after the final norm, as in
``personalab.engine.layers``) without computing full-vocabulary logits, so a loss can form
them a chunk of positions at a time.
"""

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext

import torch
import torch.nn.functional as F

from personalab.console import progress_bar
from personalab.engine.architectures import unwrap
from personalab.engine.batching import PaddedBatch, length_sorted_batches, pad_batch
from personalab.engine.chat import TokenSequence
from personalab.engine.handle import ModelHandle
from personalab.engine.hooks import hook_residual


def logits_fn(handle: ModelHandle):
    """``h -> logits`` of the model's LM head for final hidden states ``[..., hidden]``, with logit soft-capping."""
    inner = unwrap(handle.model)
    head = inner.get_output_embeddings()
    cap = getattr(inner.config.get_text_config(), "final_logit_softcapping", None)

    def fn(h: torch.Tensor) -> torch.Tensor:
        logits = head(h)
        return torch.tanh(logits / cap) * cap if cap else logits

    return fn


def final_hidden(handle: ModelHandle, batch: PaddedBatch, forward=None) -> torch.Tensor:
    """``hidden_states[n_blocks]`` ``[batch, seq, hidden]`` of a forward that skips the full LM head.

    ``forward`` is the module to call when it wraps ``handle.model`` (a data-parallel or peft wrapper).
    """
    seen: list[torch.Tensor] = []
    hook = hook_residual(handle, handle.n_blocks, lambda h: seen.append(h))
    try:
        (forward or handle.model)(**batch.model_inputs(), use_cache=False, logits_to_keep=1)
    finally:
        hook.remove()
    return seen[0]


def response_mask(seqs: list[TokenSequence], batch: PaddedBatch) -> torch.Tensor:
    """Bool ``[batch, seq]``: positions whose next token is a response token (right padding)."""
    mask = torch.zeros_like(batch.attention_mask, dtype=torch.bool)
    for b, seq in enumerate(seqs):
        mask[b, seq.prompt_len - 1 : len(seq.ids) - 1] = True
    return mask


@torch.inference_mode()
def next_token_logits(
    handle: ModelHandle, prompts: Sequence[Sequence[int]], batch_size: int = 8
) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Float32 logits ``[len(rows), vocab]`` of the token after each prompt, one length-sorted,
    left-padded batch at a time: yields ``(rows, logits)`` with ``rows`` the prompt indices."""
    for rows in length_sorted_batches([len(p) for p in prompts], batch_size):
        batch = pad_batch([prompts[i] for i in rows], handle.tokenizer.pad_token_id, "left", handle.input_device)
        logits = handle.model(**batch.model_inputs(), use_cache=False, logits_to_keep=1).logits
        yield rows, logits[:, -1].float()


@torch.inference_mode()
def logprobs_at(
    handle: ModelHandle,
    sequences: Sequence[TokenSequence],
    positions: Sequence[Sequence[int]],
    batch_size: int = 16,
    interventions: Callable[[list[int]], AbstractContextManager] | None = None,
    progress: bool = False,
    label: str = "teacher-forced",
) -> list[torch.Tensor]:
    """Float32 log-probabilities ``[len(positions[i]), vocab]`` of the token after each listed position
    (indices in the unpadded sequence) of each sequence, in one teacher-forced forward per
    length-sorted, right-padded batch; ``interventions(rows)`` is entered around each batch's
    forward with the sequence indices of its rows. The LM head runs on the listed positions only."""
    head = logits_fn(handle)
    out: list[torch.Tensor | None] = [None] * len(sequences)
    with progress_bar(label, len(sequences), progress) as advance:
        for rows in length_sorted_batches([len(s.ids) for s in sequences], batch_size):
            batch = pad_batch(
                [sequences[i].ids for i in rows], handle.tokenizer.pad_token_id, "right", handle.input_device
            )
            with interventions(rows) if interventions else nullcontext():
                hidden = final_hidden(handle, batch)
            for j, i in enumerate(rows):
                index = torch.as_tensor(list(positions[i]), dtype=torch.long, device=hidden.device)
                out[i] = torch.log_softmax(head(hidden[j, index]).float(), dim=-1).cpu()
            advance(len(rows))
    return out


@torch.inference_mode()
def response_nll(
    handle: ModelHandle,
    sequences: Sequence[TokenSequence],
    batch_size: int = 16,
    chunk: int = 256,
    progress: bool = False,
    label: str = "fluency",
) -> list[float | None]:
    """Mean negative log-likelihood (nats) per response token of each sequence: ``-mean log p(ids[t] | ids[:t])`` over
    ``t`` in ``prompt_len .. len(ids) - 1``, teacher-forced, one forward per length-sorted, right-padded batch; the LM
    head runs on the response positions only, ``chunk`` at a time, in float32. ``None`` for an empty response. With
    an engine of its own (vLLM) the engine computes it (``ModelHandle.forward_engine``)."""
    if handle.forward_engine is not None:
        return handle.forward_engine.response_nll(handle, sequences, progress, label)
    head = logits_fn(handle)
    out: list[float | None] = [None] * len(sequences)
    rows = [i for i, seq in enumerate(sequences) if seq.response_len > 0]
    with progress_bar(label, len(rows), progress) as advance:
        for batch_rows in length_sorted_batches([len(sequences[i].ids) for i in rows], batch_size):
            chosen = [rows[j] for j in batch_rows]
            batch = pad_batch([sequences[i].ids for i in chosen], handle.tokenizer.pad_token_id, "right",
                              handle.input_device)  # fmt: skip
            hidden = final_hidden(handle, batch)
            for j, i in enumerate(chosen):
                seq = sequences[i]
                states = hidden[j, seq.prompt_len - 1 : len(seq.ids) - 1]
                targets = torch.tensor(seq.ids[seq.prompt_len :], device=states.device)
                total = sum(
                    float(F.cross_entropy(head(states[k : k + chunk]).float(), targets[k : k + chunk], reduction="sum"))
                    for k in range(0, len(targets), chunk)
                )
                out[i] = total / len(targets)
            advance(len(chosen))
    return out
