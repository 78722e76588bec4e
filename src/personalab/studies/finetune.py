"""Fine-tuning through persona vectors: monitored fine-tunes, preventative steering, directional ablation.

The objective is the cross-entropy of the assistant tokens of chat records and of the token that ends
the answer (the template's end of turn, or end-of-sequence without a template), prompt and padding
masked; a record longer than ``max_length`` tokens is cut at the end and counted. It is trained by
the engine's one loop (``personalab.engine.training``: LoRA or full, data parallelism, bf16,
accumulation, warm-up and decay).

Monitoring, at step 0 (the base model) and every checkpoint, for each monitored vector at
``monitor_layer`` (``hidden_states[l]``, ``personalab.engine.layers``): the projection onto the
unit vector of the residual at the last prompt token and of the mean residual over the model's
own greedy answer (``monitor_tokens`` tokens), averaged over a fixed prompt set (the vector's
trait's evaluation questions by default); the shift is that projection minus step 0's.

Training-only interventions, on every position of every training forward (never in
monitoring, never in the saved weights): ``steer`` adds ``alpha * v`` at a layer (preventative
steering; ``alpha`` on the raw or normalised scale of ``personalab.engine.scale``), ``ablate``
projects ``v`` out of the residual at a layer (concept-ablation fine-tuning).

Checkpoints go to ``checkpoints/step-N/`` (the adapter, or the full model, loadable by every
command) with ``trainer_state.pt``; a killed run resumes from its last checkpoint and ends
exactly as an uninterrupted run.
"""

import math
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from pydantic import Field

from personalab.console import progress_bar, say
from personalab.engine.batching import pad_batch
from personalab.engine.capture import capture
from personalab.engine.chat import TokenSequence
from personalab.engine.forward import final_hidden, logits_fn, response_mask
from personalab.engine.generation import SamplingParams, greedy_ids, weights_saved
from personalab.engine.handle import ModelHandle
from personalab.engine.interventions import Ablate, Steer, intervene
from personalab.engine.layers import check_layers, check_vector
from personalab.engine.lora import save_trained, with_lora
from personalab.engine.losses import chunked_cross_entropy
from personalab.engine.scale import DEFAULT_SCALE, Scale, scaled_vector
from personalab.engine.training import TrainConfig, Trainer, accelerator_for
from personalab.errors import InvalidInputError
from personalab.figures.plots import Panel, plot_over_training, plot_training_curve, short_name
from personalab.figures.tables import write_csv
from personalab.hashes import content_key, vector_sha256
from personalab.judging.judges import Judge, judge_record
from personalab.judging.scorecard import evaluation_plan, scored_answers, summary
from personalab.judging.scoring import Plan
from personalab.records import Record, data_file
from personalab.runfolder import RunFolder, claim, model_settings
from personalab.store import Store
from personalab.traits import Trait, calibration_prompts


class FinetuneConfig(TrainConfig):
    """Settings of a fine-tune: the optimisation (``TrainConfig``) and what is monitored."""

    lr: float = Field(1e-5, gt=0)
    grad_accum: int = Field(8, ge=1)
    max_length: int = Field(1024, ge=2)
    checkpoint_every: int = Field(50, ge=1)
    monitor_layer: int | None = None
    monitor_tokens: int = Field(64, ge=1)
    monitor_samples: int = Field(1, ge=1)
    loss_chunk: int = Field(64, ge=1)


@dataclass
class Monitored:
    """A vector to monitor: its name, direction (``[hidden]`` at the monitor layer) and prompt set (questions),
    the trait to judge (when judging) and where the vector came from."""

    name: str
    direction: torch.Tensor
    questions: list[str]
    trait: Trait | None = None
    source: str = ""


@dataclass
class TrainingIntervention:
    """A training-only intervention: ``kind`` is ``steer`` or ``ablate``."""

    kind: str
    layer: int
    vector: torch.Tensor
    alpha: float = 0.0
    scale: Scale = DEFAULT_SCALE
    record: dict = field(default_factory=dict)


def check_records(records: list[Record]) -> None:
    """Every record needs an assistant answer to train on."""
    missing = next((r for r in records if r.response is None or not r.response.strip()), None)
    if missing is not None:
        raise InvalidInputError(
            f"{missing.where}: no assistant answer to train on; end each record with an assistant turn"
        )


def training_sequences(handle: ModelHandle, records: list[Record], max_length: int) -> tuple[list[TokenSequence], dict]:
    """Encoded records, each answer closed by the template's end-of-turn token (the end-of-sequence token
    without a template) so the model learns to stop, and cut to ``max_length`` tokens; counts of records,
    truncated and unusable (nothing of the answer left) ones."""
    check_records(records)
    out, truncated, unusable = [], 0, 0
    for record in records:
        seq = record.encode(handle, end=True)
        if len(seq.ids) > max_length:
            truncated += 1
            if seq.prompt_len >= max_length:
                unusable += 1
                continue
            seq = TokenSequence(seq.ids[:max_length], seq.prompt_len)
        if seq.response_len > 0:
            out.append(seq)
    if not out:
        raise InvalidInputError("no record has an answer within --max-length; raise --max-length")
    return out, {"records": len(records), "truncated": truncated, "unusable": unusable, "trained": len(out)}


def check(
    n_blocks: int,
    hidden: int,
    config: FinetuneConfig,
    monitors: list[Monitored],
    interventions: list[TrainingIntervention],
) -> None:
    """One-line errors before training (and before loading the model): layers, vector widths, conflicting
    interventions."""
    if config.monitor_layer is not None:
        check_layers(config.monitor_layer, n_blocks)
    for monitored in monitors:
        if monitored.direction.shape != (hidden,):
            raise InvalidInputError(
                f"monitor vector {monitored.name} has width {monitored.direction.shape[-1]} but the model has "
                f"{hidden}; use a vector extracted from this model"
            )
    layers: dict[int, TrainingIntervention] = {}
    for iv in interventions:
        check_layers(iv.layer, n_blocks)
        check_vector(iv.vector, iv.layer, n_blocks, hidden)
        other = layers.setdefault(iv.layer, iv)
        if other is not iv and not torch.equal(torch.as_tensor(other.vector), torch.as_tensor(iv.vector)):
            raise InvalidInputError(
                f"`steer_vector` and `ablate_vector` at layer {iv.layer} use different vectors; use one vector"
            )


def assistant_loss(
    handle: ModelHandle, micro: list[TokenSequence], forward=None, hooks: list = (), chunk: int = 64
) -> torch.Tensor:
    """Mean cross-entropy of the answer tokens of ``micro`` (right-padded; prompt and padding masked), the
    forward through ``forward`` (a data-parallel wrapper) with training-only ``hooks`` in place."""
    batch = pad_batch([s.ids for s in micro], handle.tokenizer.pad_token_id, "right", handle.input_device)
    with intervene(handle, *hooks) if hooks else nullcontext():
        hidden = final_hidden(handle, batch, forward)
    targets = torch.roll(batch.input_ids, -1, dims=1)
    return chunked_cross_entropy(hidden, targets, response_mask(micro, batch), logits_fn(handle), chunk)


class Monitor:
    """Projections of the model's activations onto each monitored vector, relative to step 0."""

    def __init__(self, handle: ModelHandle, monitors: list[Monitored], layer: int, config: FinetuneConfig):
        self.handle, self.monitors, self.layer, self.config = handle, monitors, layer, config

    def measure(self, label: str = "monitor", progress: bool = False) -> dict[str, dict[str, float]]:
        """Per vector, the mean projection at the last prompt token and over the model's own answers."""
        out = {}
        with progress_bar(label, len(self.monitors), progress) as advance:
            for monitored in self.monitors:
                out[monitored.name] = self._one(monitored)
                advance(1)
        return out

    def _one(self, monitored: "Monitored") -> dict[str, float]:
        handle, batch = self.handle, self.config.micro_batch_size * 4
        prompts = [handle.encode(None, q) for q in monitored.questions]
        unit = monitored.direction / monitored.direction.norm()
        last = capture(handle, prompts, [self.layer], "last_prompt", batch_size=batch)
        answers = greedy_ids(handle, prompts, self.config.monitor_tokens, batch)
        own = [TokenSequence(p.ids + tuple(a), p.prompt_len) for p, a in zip(prompts, answers, strict=True) if a]
        response = capture(handle, own, [self.layer], "response", batch_size=batch)
        return {
            "last_prompt": float((last[:, 0] @ unit).mean()),
            "response_mean": float((response[:, 0] @ unit).mean()),
        }


def _latest(out: Path) -> Path | None:
    done = [p for p in (out / "checkpoints").glob("step-*") if (p / "trainer_state.pt").is_file()]
    return max(done, key=lambda p: int(p.name.removeprefix("step-")), default=None)


def finetune(
    handle: ModelHandle,
    records: list[Record],
    config: FinetuneConfig,
    out: str | Path,
    monitors: list[Monitored] = (),
    interventions: list[TrainingIntervention] = (),
    judge: Judge | None = None,
    epochs: float | None = None,
    progress: bool = True,
    dry_run: bool = False,
) -> "pd.DataFrame | Plan":
    """Fine-tune ``handle.model`` in place into ``out`` (resuming from its last checkpoint); returns the
    monitor table (step, vector, layer, position, projection, shift). Prints the plan first: the steps left and
    what the monitoring judge will be asked (``plan_monitoring``); ``dry_run`` returns that ``Plan`` there."""
    out = Path(out)
    monitors, interventions = list(monitors), list(interventions)
    layer = config.monitor_layer if config.monitor_layer is not None else handle.n_blocks // 2
    check(handle.n_blocks, handle.hidden_size, config, monitors, interventions)
    sequences, counts = training_sequences(handle, records, config.max_length)
    accelerator = accelerator_for(handle)
    main = accelerator.is_main_process
    progress = progress and main
    if epochs is not None:
        per_step = config.micro_batch_size * config.grad_accum * accelerator.num_processes
        config = config.model_copy(update={"steps": max(1, math.ceil(epochs * len(sequences) / per_step))})
    latest = _latest(out)
    start = int(latest.name.removeprefix("step-")) if latest is not None else 0
    per_step = config.micro_batch_size * config.grad_accum * accelerator.num_processes
    say(f"plan for training: {config.steps - start} of {config.steps} steps left, {per_step} sequences each "
        f"({len(sequences)} training sequences)", progress)  # fmt: skip
    plan = plan_monitoring(handle, monitors, judge, out, config, start)
    if judge is not None:
        say(plan.describe("the monitoring judge"), progress)
    if dry_run:
        return plan
    settings = {
        **model_settings(handle),
        "data_sha256": content_key([r.content() for r in records]),
        "config": config.model_dump(mode="json"),
        "interventions": [
            {
                "kind": iv.kind,
                "layer": iv.layer,
                "alpha": iv.alpha,
                "scale": iv.scale,
                "vector": vector_sha256(iv.vector),
            }
            for iv in interventions
        ],
        "monitors": [
            {"name": m.name, "vector": vector_sha256(m.direction), "prompts": content_key(m.questions)}
            for m in monitors
        ],
        "judge": judge.name if judge is not None else None,
    }
    prompts = handle.chat.describe()
    with accelerator.main_process_first():
        run = (
            claim(
                out,
                "finetune",
                settings,
                inputs={"data": data_file(records)},
                prompt_format=prompts,
                recorded=judge_record(judge),
            )  # fmt: skip
            if main
            else None
        )
    say(f"prompt format: {prompts}", progress)
    hooks = []
    for iv in interventions:
        if iv.kind == "steer":
            scaled = scaled_vector(handle, iv.vector, iv.layer, iv.scale, calibration_prompts(handle))
            iv.record = scaled.record([iv.alpha])
            say(f"training-only steering: {scaled.describe([iv.alpha])}", progress)
            hooks.append(Steer(iv.layer, scaled.vector, iv.alpha, "all"))
        else:
            iv.record = {"layer": iv.layer}
            hooks.append(Ablate(iv.layer, iv.vector, "all"))
    torch.manual_seed(config.seed)
    student = with_lora(handle.model, config.lora_rank, config.lora_alpha) if config.lora_rank else handle.model
    trainer = Trainer(accelerator, handle, student, config)
    monitor = Monitor(handle, monitors, layer, config)
    rows: list[dict] = []
    base: dict = {}
    if latest is not None:
        state = torch.load(latest / "trainer_state.pt", weights_only=False)
        trainer.restore(state["trainer"])
        rows, base = state["monitor"], state["base"]
        say(f"resuming from {latest} (step {trainer.step} of {config.steps})", progress)

    def loss(micro: list[TokenSequence]) -> torch.Tensor:
        return assistant_loss(handle, micro, trainer.wrapped, hooks, config.loss_chunk)

    def observe(step: int) -> None:
        """Monitor at ``step`` (main process; the others wait) and append the rows."""
        if main and monitors:
            student.eval()
            with torch.no_grad():
                measured = monitor.measure(f"monitor at step {step}", progress)
                if not base:
                    base.update(measured)
                for name, values in measured.items():
                    for position, value in values.items():
                        rows.append(
                            {
                                "step": step,
                                "vector": name,
                                "layer": layer,
                                "position": position,
                                "projection": value,
                                "shift": value - base[name][position],
                            }
                        )
                rows.extend(_judged(handle, monitors, judge, out, step, config))
            student.train()
        accelerator.wait_for_everyone()

    def checkpoint(step: int) -> None:
        if step % config.checkpoint_every and step != config.steps:
            return
        folder = out / "checkpoints" / f"step-{step}"
        if main:
            save_trained(student, folder)
            handle.tokenizer.save_pretrained(folder)
            weights_saved(handle, folder)
        observe(step)
        if main:
            state = {"trainer": trainer.state(), "monitor": rows, "base": base}
            torch.save(state, folder / ".trainer_state.partial")
            (folder / ".trainer_state.partial").replace(folder / "trainer_state.pt")
            _outputs(run, handle, rows, trainer.losses, config, counts, monitors, interventions)
        accelerator.wait_for_everyone()

    if trainer.step == 0:
        out.mkdir(parents=True, exist_ok=True)
        observe(0)
    trainer.train(sequences, loss, config.steps, progress, "finetune", checkpoint)
    if main:
        _outputs(run, handle, rows, trainer.losses, config, counts, monitors, interventions)
    accelerator.wait_for_everyone()
    return pd.DataFrame(rows)


def _observed(start: int, config: FinetuneConfig) -> list[int]:
    """The steps monitored after step ``start``: 0 on a fresh run, each checkpoint and the last step."""
    every, steps = config.checkpoint_every, config.steps
    return ([0] if start == 0 else []) + [s for s in range(start + 1, steps + 1) if s % every == 0 or s == steps]


def _judging(config: FinetuneConfig) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_new_tokens=config.monitor_tokens)


def plan_monitoring(
    handle: ModelHandle,
    monitors: Sequence["Monitored"],
    judge: Judge | None,
    out: Path,
    config: FinetuneConfig,
    start: int = 0,
) -> Plan:
    """What the monitoring judge will be asked from step ``start`` on: at every monitored step, each monitored
    trait's evaluation questions ``monitor_samples`` times (greedy), judged for trait and coherence; the store of
    ``out`` read, nothing written. Empty without a judge."""
    if judge is None:
        return Plan.total([])
    store = out / "generations.sqlite"
    return Plan.total([
        evaluation_plan(handle, m.trait, judge, store, _label(out, step), config.monitor_samples, _judging(config))
        for step in _observed(start, config)
        for m in monitors
        if m.trait is not None
    ])  # fmt: skip


def _label(out: Path, step: int) -> str:
    return f"finetune {out} step {step}"


def _judged(handle, monitors, judge, out: Path, step: int, config: FinetuneConfig) -> list[dict]:
    if judge is None:
        return []
    rows = []
    with Store(out / "generations.sqlite") as store:
        for monitored in monitors:
            if monitored.trait is None:
                continue
            answers = scored_answers(
                handle,
                monitored.trait,
                judge,
                store,
                _label(out, step),
                config.monitor_samples,
                _judging(config),
                progress=False,
            )
            scores = summary(answers)
            rows.append(
                {
                    "step": step,
                    "vector": monitored.name,
                    "layer": None,
                    "position": "judged_trait",
                    "projection": scores["trait_mean"],
                    "shift": None,
                }
            )
            rows.append(
                {
                    "step": step,
                    "vector": monitored.name,
                    "layer": None,
                    "position": "judged_coherence",
                    "projection": scores["coherence_mean"],
                    "shift": None,
                }
            )
    return rows


def _outputs(run: RunFolder, handle, rows, losses, config: FinetuneConfig, counts, monitors, interventions) -> None:
    out = run.path
    name = short_name(handle.name)
    write_csv(pd.DataFrame({"step": range(1, len(losses) + 1), "loss": losses}), out / "training_curve.csv")
    if losses:
        title = f"fine-tuning {name}: cross-entropy of assistant tokens"
        plot_training_curve(losses, title, out / "training_curve.png", "cross-entropy (nats per token)")
    table = pd.DataFrame(rows, columns=["step", "vector", "layer", "position", "projection", "shift"])
    write_csv(table, out / "monitor.csv")
    shifts = table[table["position"].isin(["last_prompt", "response_mean"])]
    if len(shifts):
        panels = []
        for position, rows_at in shifts.groupby("position", sort=False):
            panel = Panel(f"shift along the vector ({position})", hline=0.0)
            for vector, mine in rows_at.groupby("vector", sort=False):
                panel.lines[vector] = (mine["step"], mine["shift"], None)
            panels.append(panel)
        title = f"fine-tuning {name}: projection shift along each monitored vector"
        plot_over_training(panels, "optimizer step", title, out / "monitor.png", False)
    run.write(
        model=handle.name,
        revision=handle.revision,
        config=config.model_dump(),
        data=counts,
        interventions=[{"kind": iv.kind, "layer": iv.layer, "alpha": iv.alpha, **iv.record} for iv in interventions],
        monitors=[
            {"name": m.name, "path": m.source, "trait": m.trait.name if m.trait else None, "prompts": len(m.questions)}
            for m in monitors
        ],
        steps_done=len(losses),
        checkpoints=sorted(p.name for p in (out / "checkpoints").glob("step-*")),
        weights="adapter" if config.lora_rank else "model",
    )
    lines = [
        f"# Fine-tune {out.name} of {handle.name}",
        "",
        f"- records: {counts['records']}; trained on {counts['trained']}; cut to --max-length {config.max_length}: "
        f"{counts['truncated']} ({counts['unusable']} with no answer left, left out)",
        f"- steps: {len(losses)} of {config.steps}; checkpoints: checkpoints/step-N (every {config.checkpoint_every})",
    ]
    lines += [
        f"- training-only {iv.kind} at layer {iv.layer}" + (f", alpha {iv.alpha:g}" if iv.kind == "steer" else "")
        for iv in interventions
    ]
    if len(shifts):
        last = shifts[shifts["step"] == shifts["step"].max()]
        lines += ["", "| vector | position | shift at the last checkpoint |", "|---|---|---|"]
        lines += [f"| {r.vector} | {r.position} | {r.shift:+.4g} |" for r in last.itertuples()]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
