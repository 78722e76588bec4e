"""The one training loop of every training study: the objective is what differs between them.

Training runs through ``accelerate``: bf16 autocast on a GPU that supports it, and data
parallelism when launched on several processes (``accelerate launch --multi_gpu ...`` or
``torchrun``), each with its own replica. Every step draws ``micro_batch_size * grad_accum *
processes`` examples from one seeded stream and process ``r`` takes micro-batches ``r, r + n,
...``, so ``n`` processes train exactly as one process with ``grad_accum * n`` would; gradients
are accumulated, clipped at norm 1, and AdamW steps with a linear warm-up and decay.
``state``/``restore`` carry everything a resumed run needs to continue exactly as an
uninterrupted one: step, losses, trainable weights, optimizer and schedule, and the data and
torch random states.
"""

import random
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Literal

import torch
from accelerate import Accelerator
from pydantic import BaseModel, ConfigDict, Field
from transformers import get_linear_schedule_with_warmup

from personalab.console import progress_bar
from personalab.engine.architectures import unwrap
from personalab.engine.handle import ModelHandle
from personalab.errors import InvalidInputError


class TrainConfig(BaseModel):
    """Optimisation settings shared by the training studies; ``lora_rank = None`` means full fine-tuning."""

    model_config = ConfigDict(extra="forbid")
    lora_rank: int | None = Field(8, ge=1)
    lora_alpha: float | None = None
    steps: int = Field(500, ge=1)
    micro_batch_size: int = Field(2, ge=1)
    grad_accum: int = Field(4, ge=1)
    lr: float = Field(1e-4, gt=0)
    warmup_steps: int = Field(20, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    gradient_checkpointing: bool = False
    mixed_precision: Literal["auto", "bf16", "no"] = "auto"
    seed: int = 0

    def precision(self, device: torch.device) -> str:
        """``"bf16"`` or ``"no"``; ``"auto"`` is bf16 on a GPU that supports it."""
        if self.mixed_precision != "auto":
            return self.mixed_precision
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "no"


def accelerator_for(handle: ModelHandle) -> Accelerator:
    """The process group of a training run; with several processes each must hold its own replica on its device.

    Precision is applied with ``torch.autocast`` by the trainer: accelerate's state is one per
    process and would refuse a second run with another precision.
    """
    device = handle.input_device
    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision="no")
    world = accelerator.num_processes
    if world > 1 and accelerator.device.type != "cpu" and device != accelerator.device:
        raise InvalidInputError(
            f"process {accelerator.process_index} holds the model on {device}; with {world} processes load one "
            f"replica per process on its own device ({accelerator.device})"
        )
    return accelerator


class Trainer:
    """AdamW over the trainable parameters of ``student``, prepared for data parallelism.

    ``wrapped`` is the module a loss must call for the student's forward (the data-parallel
    wrapper); the bare ``student`` is for evaluation.
    """

    def __init__(self, accelerator: Accelerator, handle: ModelHandle, student: torch.nn.Module, config: TrainConfig):
        self.accelerator, self.handle, self.student, self.config = accelerator, handle, student, config
        if config.gradient_checkpointing:
            unwrap(handle.model).gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.names = [name for name, p in student.named_parameters() if p.requires_grad]
        self.params = [p for p in student.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay)
        self.schedule = get_linear_schedule_with_warmup(optimizer, config.warmup_steps, config.steps)
        self.wrapped, self.optimizer = accelerator.prepare(student, optimizer)
        self.bf16 = config.precision(handle.input_device) == "bf16"
        self.rng = random.Random(config.seed + 1)
        self.step = 0
        self.losses: list[float] = []

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    def autocast(self):
        device = self.handle.input_device
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def train(
        self,
        examples: Sequence,
        loss: Callable[[list], torch.Tensor],
        until: int,
        progress: bool = True,
        label: str = "train",
        after_step: Callable[[int], None] | None = None,
    ) -> None:
        """Run steps ``self.step + 1 .. until``; ``loss(micro_batch)`` is the mean loss of a micro-batch and
        ``after_step(step)`` runs after each optimizer step (e.g. checkpoints)."""
        config, accelerator = self.config, self.accelerator
        self.student.train()
        with progress_bar(label, until - self.step, progress and accelerator.is_main_process) as advance:
            while self.step < until:
                size = min(config.micro_batch_size, len(examples))
                drawn = [self.rng.sample(examples, size) for _ in range(config.grad_accum * self.world)]
                total = 0.0
                for k, micro in enumerate(drawn[self.rank :: self.world]):
                    with nullcontext() if k == config.grad_accum - 1 else accelerator.no_sync(self.wrapped):
                        with self.autocast():
                            value = loss(micro)
                        accelerator.backward(value / config.grad_accum)
                    total += value.item() / config.grad_accum
                accelerator.clip_grad_norm_(self.params, 1.0)
                self.optimizer.step()
                self.schedule.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.losses.append(accelerator.reduce(torch.tensor(total, device=accelerator.device), "mean").item())
                self.step += 1
                advance(1)
                if after_step is not None:
                    after_step(self.step)
        self.student.eval()

    def state(self) -> dict:
        """What a resumed run needs to continue exactly (torch objects; ``torch.save`` it)."""
        params = dict(zip(self.names, self.params, strict=True))
        return {
            "step": self.step,
            "losses": list(self.losses),
            "trainable": {name: p.detach().cpu().clone() for name, p in params.items()},
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "rng": self.rng.getstate(),
            "torch_rng": torch.get_rng_state(),
        }

    @torch.no_grad()
    def restore(self, state: dict) -> None:
        """Continue from ``state`` (as written by ``state``)."""
        params = dict(zip(self.names, self.params, strict=True))
        if set(state["trainable"]) != set(params):
            raise InvalidInputError("the checkpoint was written by another model or training setup; use another `out`")
        for name, value in state["trainable"].items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.rng.setstate(state["rng"])
        torch.set_rng_state(state["torch_rng"])
        self.step, self.losses = state["step"], list(state["losses"])
