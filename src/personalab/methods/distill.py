"""Distillation: bake a steering vector into weights by matching the steered model.

The teacher is the base weights with ``alpha * v`` added at ``layer`` on response
positions (``v`` raw or normalised to the typical residual norm, ``personalab.engine.scale``);
the student has no hook. Trajectories are sampled from the teacher (stored in the run's
SQLite store). The loss is the token-level KL(teacher || student) over the full
vocabulary, averaged over the positions that predict response tokens (prompt and padding
masked). Full-vocabulary logits are formed ``kl_chunk`` positions at a time and the
student's are recomputed in the backward pass, so the logits of a whole batch never sit
in memory at once. With LoRA the teacher is the student with its adapter disabled; full
fine-tuning keeps a frozen copy of the base model as teacher.

Training runs through the engine's one loop (``personalab.engine.training``): bf16 autocast
on GPU, and data parallelism when launched on several processes (``accelerate launch
--multi_gpu -m personalab distill``), ``n`` processes training exactly as one process with
``grad_accum * n`` would.
"""

import copy
import math
import random
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from accelerate import Accelerator
from pydantic import Field

from personalab.console import say
from personalab.engine.batching import PaddedBatch, pad_batch
from personalab.engine.chat import TokenSequence
from personalab.engine.forward import final_hidden, logits_fn, response_mask
from personalab.engine.generation import GenerationRequest, SamplingParams, fill_store, release
from personalab.engine.handle import ModelHandle
from personalab.engine.interventions import Steer, add_vector
from personalab.engine.layers import check_layers, check_vector
from personalab.engine.lora import save_trained, with_lora
from personalab.engine.losses import chunked_kl
from personalab.engine.scale import DEFAULT_SCALE, Scale, scaled_vector
from personalab.engine.training import TrainConfig, Trainer, accelerator_for
from personalab.errors import InvalidInputError
from personalab.figures.plots import plot_training_curve, short_name
from personalab.figures.tables import write_csv
from personalab.hashes import content_key, vector_sha256
from personalab.judging.scoring import Plan, plan_judged
from personalab.runfolder import claim, model_settings
from personalab.store import Store
from personalab.traits import calibration_prompts

TRAJECTORY_SAMPLING = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=256)


class DistillConfig(TrainConfig):
    """Settings of one distillation run: the optimisation (``TrainConfig``) and what is distilled."""

    layer: int
    alpha: float
    scale: Scale = DEFAULT_SCALE
    trajectories: int = Field(500, ge=2)
    kl_chunk: int = Field(64, ge=1)
    held_out: float = Field(0.1, gt=0, lt=1)
    sampling: SamplingParams = TRAJECTORY_SAMPLING


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


def _requests(v: torch.Tensor, prompts: list[TokenSequence], config: DistillConfig) -> list[GenerationRequest]:
    """The teacher's trajectories: ``config.trajectories`` requests cycling over ``prompts``, steered by ``v``; a
    smaller count asks for a prefix of a larger one, so counts share one store."""
    digest = vector_sha256(v)
    steering = (Steer(config.layer, v, config.alpha, "generating"),)
    return [
        GenerationRequest(
            prompts[i % len(prompts)],
            {"distill": digest, "layer": config.layer, "alpha": config.alpha, "sample": i // len(prompts)},
            steering,
        )
        for i in range(config.trajectories)
    ]


def plan_distill(
    handle: ModelHandle, vector: torch.Tensor, prompts: list[TokenSequence], store: Path | None, config: DistillConfig
) -> Plan:
    """What ``distill`` would sample as trajectories, what the store at ``store`` holds excluded; writes nothing (the
    scale's calibration forward pass runs)."""
    check_inputs(handle, vector, prompts, config)
    scaled = scaled_vector(handle, vector, config.layer, config.scale, calibration_prompts(handle))
    return plan_judged(handle, store, _requests(scaled.vector, prompts, config), config.sampling, None)


def trajectories(
    handle: ModelHandle,
    v: torch.Tensor,
    prompts: list[TokenSequence],
    store: Store,
    config: DistillConfig,
    progress: bool,
    accelerator: Accelerator,
) -> list[TokenSequence]:
    """``config.trajectories`` steered answers, cycling over ``prompts``; an answer that ended with a stop
    token keeps it, so the student learns where the teacher stops; empty trajectories are dropped.

    Each process samples its share of the batches into the shared store; all then read every answer.
    """
    requests = _requests(v, prompts, config)
    if accelerator.is_main_process:
        say(plan_judged(handle, store.path, requests, config.sampling, None).describe("trajectories"), progress)
    keys = fill_store(
        handle,
        store,
        requests,
        config.sampling,
        progress=progress,
        shard=(accelerator.process_index, accelerator.num_processes),
    )
    accelerator.wait_for_everyone()
    texts, stops = store.texts(keys), store.stops(keys)
    tok = handle.tokenizer
    seqs = [
        TokenSequence(
            r.prompt.ids
            + tuple(tok.encode(texts[k], add_special_tokens=False))
            + (() if stops[k] is None else (stops[k],)),
            r.prompt.prompt_len,
        )
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
            add_vector(self.teacher, self.v, self.config.layer, alpha, "generating", prompt_lengths=lengths),
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
        """``(sum of per-token KL, response tokens)`` over ``seqs``, in batches of ``config.micro_batch_size``.

        Calls the bare student, never its data-parallel wrapper, so processes may evaluate unequal shares.
        """
        total = 0.0
        for i in range(0, len(seqs), self.config.micro_batch_size):
            part = seqs[i : i + self.config.micro_batch_size]
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
    accelerator = accelerator_for(handle)
    rank, world = accelerator.process_index, accelerator.num_processes
    progress = progress and accelerator.is_main_process
    say(scaled.describe([config.alpha]), progress)
    out = Path(out)
    settings = {
        **model_settings(handle),
        "vector_sha256": vector_sha256(vector),
        "prompts_sha256": content_key([list(p.ids) for p in prompts]),
        "config": config.model_dump(mode="json"),
    }
    say(f"prompt format: {handle.chat.describe()}", progress)
    with accelerator.main_process_first():
        main = accelerator.is_main_process
        run = claim(out, "distill", settings, prompt_format=handle.chat.describe()) if main else None
        store = Store(store_path or out / "generations.sqlite")
    try:
        seqs = trajectories(handle, v, prompts, store, config, progress, accelerator)
    finally:
        store.close()
        release(handle)  # training needs the memory an engine of its own holds
    if len(seqs) < 2:
        raise InvalidInputError(f"only {len(seqs)} non-empty trajectories; raise `trajectories`")
    order = list(range(len(seqs)))
    random.Random(config.seed).shuffle(order)
    n_held = max(1, round(len(seqs) * config.held_out))
    held, train = [seqs[i] for i in order[:n_held]], [seqs[i] for i in order[n_held:]]

    torch.manual_seed(config.seed)
    student, teacher = _student(handle, config)
    trainer = Trainer(accelerator, handle, student, config)
    models = TeacherStudent(handle, student, teacher, v, config, forward=trainer.wrapped)

    size = config.micro_batch_size
    my_held = [s for start in range(rank * size, len(held), world * size) for s in held[start : start + size]]

    def held_out_kl(steered: bool = True) -> float:
        """KL per response token over ``held``: whole batches dealt to processes, padded as in one process."""
        with trainer.autocast():
            mine = models.kl_total(my_held, steered)
        total = accelerator.reduce(torch.tensor(mine, dtype=torch.float64, device=accelerator.device), "sum")
        return (total[0] / total[1]).item()

    student.eval()
    start = held_out_kl()
    trainer.train(train, models.kl, config.steps, progress, "distill")
    held_out = {"kl_start": start, "kl_end": held_out_kl(), "kl_to_base_end": held_out_kl(False)}
    trainable = sum(p.numel() for p in trainer.params)
    if accelerator.is_main_process:
        steering = scaled.record([config.alpha])
        split = (len(train), len(held))
        _save(run, handle, student, config, trainer.losses, held_out, trainable, split, merge, world, steering)
    accelerator.wait_for_everyone()
    return DistillResult(student, trainer.losses, held_out, trainable)


def _save(run, handle, student, config, losses, held_out, trainable, split, merge, processes, steering) -> None:
    out = run.path
    target = out / ("adapter" if config.lora_rank is not None else "model")
    save_trained(student, target)
    handle.tokenizer.save_pretrained(target)
    if merge and config.lora_rank is not None:
        student.merge_and_unload().save_pretrained(out / "model")
        handle.tokenizer.save_pretrained(out / "model")
    write_csv(pd.DataFrame({"step": range(1, len(losses) + 1), "loss": losses}), out / "training_curve.csv")
    title = f"distilling into {short_name(handle.name)}: layer {config.layer}, alpha {config.alpha:g}, {config.scale}"
    plot_training_curve(losses, title, out / "training_curve.png", "KL(steered teacher || student)")
    run.write(
        model=handle.name,
        revision=handle.revision,
        config=config.model_dump(),
        trainable_parameters=trainable,
        processes=processes,
        weights_dtype=str(handle.dtype).removeprefix("torch."),
        mixed_precision=config.precision(handle.input_device),
        trajectories={"train": split[0], "held_out": split[1]},
        steering=steering,
        held_out_kl=held_out,
        weights=str(target.name),
    )
