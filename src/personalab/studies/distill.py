"""Distillation: bake a steering vector into weights by matching the steered model.

The teacher is the base weights with ``alpha * v`` added at ``layer`` on response
positions (``v`` raw or normalised to the mean residual norm, ``personalab.engine.scale``);
the student has no hook. Trajectories are sampled from the teacher (stored in the run's
SQLite store). The loss is the token-level KL(teacher || student) over the full
vocabulary, averaged over the positions that predict response tokens (prompt and padding
masked). Full-vocabulary logits are formed ``kl_chunk`` positions at a time and the
student's are recomputed in the backward pass, so the logits of a whole batch never sit
in memory at once. With LoRA the teacher is the student with its adapter disabled; full
fine-tuning keeps a frozen copy of the base model as teacher.

Training runs through ``accelerate``: bf16 autocast on GPU, and data parallelism when
launched on several processes (``accelerate launch --multi_gpu -m personalab distill``),
each with its own replica of the model. Every step draws ``batch_size * grad_accum * processes``
trajectories from one seeded stream and process ``r`` takes micro-batches ``r, r + n, ...``,
so ``n`` processes train exactly as one process with ``grad_accum * n`` would.
"""

import copy
import json
import math
import random
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from pydantic import BaseModel, ConfigDict, Field
from torch.utils.checkpoint import checkpoint
from transformers import get_linear_schedule_with_warmup

from personalab.engine.batching import PaddedBatch, pad_batch
from personalab.engine.chat import TokenSequence
from personalab.engine.forward import final_hidden, logits_fn, response_mask
from personalab.engine.generation import GenerationRequest, SamplingParams, fill_store
from personalab.engine.interventions import steer
from personalab.engine.layers import check_layers, check_vector
from personalab.engine.model import ModelHandle, unwrap, with_lora
from personalab.engine.scale import Scale, scaled_vector
from personalab.errors import InvalidInputError
from personalab.report.plots import plot_training_curve, short_name
from personalab.report.progress import progress_bar, say
from personalab.store import Store
from personalab.traits import calibration_prompts
from personalab.vectors import vector_sha256

TRAJECTORY_SAMPLING = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=256)


class DistillConfig(BaseModel):
    """Settings of one distillation run; ``lora_rank = None`` means full fine-tuning."""

    model_config = ConfigDict(extra="forbid")
    layer: int
    alpha: float
    scale: Scale = "raw"
    lora_rank: int | None = Field(8, ge=1)
    lora_alpha: float | None = None
    trajectories: int = Field(500, ge=2)
    steps: int = Field(500, ge=1)
    batch_size: int = Field(2, ge=1)
    grad_accum: int = Field(4, ge=1)
    lr: float = Field(1e-4, gt=0)
    warmup_steps: int = Field(20, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    gradient_checkpointing: bool = False
    kl_chunk: int = Field(64, ge=1)
    held_out: float = Field(0.1, gt=0, lt=1)
    mixed_precision: Literal["auto", "bf16", "no"] = "auto"
    sampling: SamplingParams = TRAJECTORY_SAMPLING
    seed: int = 0

    def precision(self, device: torch.device) -> str:
        """``"bf16"`` or ``"no"``; ``"auto"`` is bf16 on a GPU that supports it."""
        if self.mixed_precision != "auto":
            return self.mixed_precision
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "no"


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


@dataclass
class DistillResult:
    student: torch.nn.Module
    losses: list[float]
    held_out: dict[str, float]
    trainable: int


def check_inputs(
    handle: ModelHandle, vector: torch.Tensor, prompts: list[TokenSequence], config: DistillConfig
) -> None:
    """Validate before any work: layer range, vector width and values, a non-empty prompt set."""
    check_layers(config.layer, handle.n_blocks)
    check_vector(vector, config.layer, handle.n_blocks, handle.hidden_size)
    if not prompts:
        raise InvalidInputError("the prompt set is empty; give a trait with extraction questions or a JSONL of prompts")
    if not math.isfinite(config.alpha):
        raise InvalidInputError("alpha must be a finite number")


def trajectories(
    handle: ModelHandle,
    v: torch.Tensor,
    prompts: list[TokenSequence],
    store: Store,
    config: DistillConfig,
    progress: bool,
    accelerator: Accelerator,
) -> list[TokenSequence]:
    """``config.trajectories`` steered answers, cycling over ``prompts``; empty answers are dropped.

    Each process samples its share of the batches into the shared store; all then read every answer.
    """
    digest = vector_sha256(v)
    requests = [
        GenerationRequest(
            prompts[i % len(prompts)],
            {"distill": digest, "layer": config.layer, "alpha": config.alpha, "sample": i // len(prompts)},
        )
        for i in range(config.trajectories)
    ]
    keys = fill_store(
        handle,
        store,
        requests,
        config.sampling,
        progress=progress,
        steering=lambda rows: steer(handle, v, config.layer, alpha=config.alpha, positions="response"),
        shard=(accelerator.process_index, accelerator.num_processes),
    )
    accelerator.wait_for_everyone()
    texts = store.texts(keys)
    tok = handle.tokenizer
    seqs = [
        TokenSequence(r.prompt.ids + tuple(tok.encode(texts[k], add_special_tokens=False)), r.prompt.prompt_len)
        for r, k in zip(requests, keys, strict=True)
    ]
    return [s for s in seqs if s.response_len > 0]


class TeacherStudent:
    """Student and teacher forwards. The teacher is ``teacher`` with the steering hook on response
    positions; for LoRA it is the student itself with the adapter disabled. ``forward`` is the
    module called for the student's forward when it wraps ``student`` (data parallelism)."""

    def __init__(
        self, handle: ModelHandle, student, teacher: ModelHandle, v: torch.Tensor, config: DistillConfig, forward=None
    ):
        self.handle, self.student, self.teacher, self.v, self.config = handle, student, teacher, v, config
        self.forward = forward or student
        self.lora = teacher is handle
        self.student_logits, self.teacher_logits = logits_fn(handle), logits_fn(teacher)

    def _teacher_hidden(self, seqs: list[TokenSequence], batch: PaddedBatch, steered: bool) -> torch.Tensor:
        lengths = [s.prompt_len for s in seqs]
        alpha = self.config.alpha if steered else 0.0
        with (
            torch.no_grad(),
            self.student.disable_adapter() if self.lora else nullcontext(),
            steer(self.teacher, self.v, self.config.layer, alpha, "response", prompt_lengths=lengths),
        ):
            return final_hidden(self.teacher, batch)

    def kl(self, seqs: list[TokenSequence], steered: bool = True, forward=None) -> torch.Tensor:
        """KL(teacher || student) per response token of ``seqs``; ``steered=False`` compares with the
        unsteered base instead. The student's forward calls ``forward`` (default ``self.forward``)."""
        batch = pad_batch([s.ids for s in seqs], self.handle.tokenizer.pad_token_id, "right", self.handle.input_device)
        target = self._teacher_hidden(seqs, batch, steered)
        student = final_hidden(self.handle, batch, forward or self.forward)
        mask = response_mask(seqs, batch)
        return chunked_kl(student, target, mask, self.student_logits, self.teacher_logits, self.config.kl_chunk)

    @torch.no_grad()
    def kl_total(self, seqs: list[TokenSequence], steered: bool = True) -> tuple[float, int]:
        """``(sum of per-token KL, response tokens)`` over ``seqs``, in batches of ``config.batch_size``.

        Calls the bare student, never its data-parallel wrapper, so processes may evaluate unequal shares.
        """
        total = 0.0
        for i in range(0, len(seqs), self.config.batch_size):
            part = seqs[i : i + self.config.batch_size]
            total += self.kl(part, steered, self.student).item() * sum(s.response_len for s in part)
        return total, sum(s.response_len for s in seqs)


def _student(handle: ModelHandle, config: DistillConfig):
    """``(student, teacher)``: a LoRA-wrapped model and itself, or the model and a frozen copy."""
    if config.lora_rank is not None:
        return with_lora(handle.model, config.lora_rank, config.lora_alpha), handle
    frozen = copy.deepcopy(handle.model).eval().requires_grad_(False)
    return handle.model, ModelHandle.from_model(frozen, handle.tokenizer, name=handle.name, revision=handle.revision)


def distill(
    handle: ModelHandle,
    vector: torch.Tensor,
    prompts: list[TokenSequence],
    config: DistillConfig,
    out: str | Path,
    progress: bool = True,
    store_path: str | Path | None = None,
    merge: bool = False,
) -> DistillResult:
    """Train a student to match the steered model; writes trajectories, weights and curves into ``out``.

    ``handle.model`` is trained in place (LoRA layers are injected into it). Trajectories are
    stored in ``store_path`` (default ``out/generations.sqlite``); runs that share a store
    share their first trajectories. ``merge`` also writes a LoRA student merged into
    ``out/model``, loadable with ``from_pretrained``. Under a multi-process launch each
    process passes its own replica, on ``PartialState().device``.
    """
    check_inputs(handle, vector, prompts, config)
    scaled = scaled_vector(handle, vector, config.layer, config.scale, calibration_prompts(handle))
    v = scaled.vector
    device = handle.input_device
    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision="no")
    bf16 = config.precision(device) == "bf16"

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    rank, world = accelerator.process_index, accelerator.num_processes
    if world > 1 and accelerator.device.type != "cpu" and device != accelerator.device:
        raise InvalidInputError(
            f"process {rank} holds the model on {device}; with {world} processes load one replica "
            f"per process on its own device ({accelerator.device})"
        )
    progress = progress and accelerator.is_main_process
    say(scaled.describe([config.alpha]), progress)
    out = Path(out)
    with accelerator.main_process_first():
        store = Store(store_path or out / "generations.sqlite")
    try:
        seqs = trajectories(handle, v, prompts, store, config, progress, accelerator)
    finally:
        store.close()
    if len(seqs) < 2:
        raise InvalidInputError(f"only {len(seqs)} non-empty trajectories; raise --trajectories")
    order = list(range(len(seqs)))
    random.Random(config.seed).shuffle(order)
    n_held = max(1, round(len(seqs) * config.held_out))
    held, train = [seqs[i] for i in order[:n_held]], [seqs[i] for i in order[n_held:]]

    torch.manual_seed(config.seed)
    student, teacher = _student(handle, config)
    if config.gradient_checkpointing:
        unwrap(handle.model).gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    schedule = get_linear_schedule_with_warmup(optimizer, config.warmup_steps, config.steps)
    wrapped, optimizer = accelerator.prepare(student, optimizer)
    models = TeacherStudent(handle, student, teacher, v, config, forward=wrapped)

    size = config.batch_size
    my_held = [s for start in range(rank * size, len(held), world * size) for s in held[start : start + size]]

    def held_out_kl(steered: bool = True) -> float:
        """KL per response token over ``held``: whole batches dealt to processes, padded as in one process."""
        with autocast():
            mine = models.kl_total(my_held, steered)
        total = accelerator.reduce(torch.tensor(mine, dtype=torch.float64, device=accelerator.device), "sum")
        return (total[0] / total[1]).item()

    student.eval()
    start = held_out_kl()
    student.train()
    rng = random.Random(config.seed + 1)
    losses: list[float] = []
    with progress_bar("distill", config.steps, progress) as advance:
        for _ in range(config.steps):
            drawn = [rng.sample(train, min(config.batch_size, len(train))) for _ in range(config.grad_accum * world)]
            total = 0.0
            for k, micro in enumerate(drawn[rank::world]):
                with nullcontext() if k == config.grad_accum - 1 else accelerator.no_sync(wrapped):
                    with autocast():
                        loss = models.kl(micro)
                    accelerator.backward(loss / config.grad_accum)
                total += loss.item() / config.grad_accum
            accelerator.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(accelerator.reduce(torch.tensor(total, device=accelerator.device), "mean").item())
            advance(1)
    student.eval()
    held_out = {"kl_start": start, "kl_end": held_out_kl(), "kl_to_base_end": held_out_kl(False)}
    trainable = sum(p.numel() for p in params)
    if accelerator.is_main_process:
        steering = scaled.record([config.alpha])
        split = (len(train), len(held))
        _save(handle, student, config, out, losses, held_out, trainable, split, merge, world, steering)
    accelerator.wait_for_everyone()
    return DistillResult(student, losses, held_out, trainable)


def _save(handle, student, config, out: Path, losses, held_out, trainable, split, merge, processes, steering) -> None:
    target = out / ("adapter" if config.lora_rank is not None else "model")
    student.save_pretrained(target)
    handle.tokenizer.save_pretrained(target)
    if merge and config.lora_rank is not None:
        student.merge_and_unload().save_pretrained(out / "model")
        handle.tokenizer.save_pretrained(out / "model")
    (out / "training_curve.csv").write_text("step,loss\n" + "".join(f"{i + 1},{x}\n" for i, x in enumerate(losses)))
    title = (
        f"distill {out.name}: {short_name(handle.name)}, layer {config.layer}, alpha {config.alpha:g} ({config.scale})"
    )
    plot_training_curve(losses, title, out / "training_curve.png", "KL(steered teacher || student)")
    meta = {
        "model": handle.name,
        "revision": handle.revision,
        "config": config.model_dump(),
        "trainable_parameters": trainable,
        "processes": processes,
        "weights_dtype": str(handle.dtype).removeprefix("torch."),
        "mixed_precision": config.precision(handle.input_device),
        "trajectories": {"train": split[0], "held_out": split[1]},
        "steering": steering,
        "held_out_kl": held_out,
        "weights": str(target.name),
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
