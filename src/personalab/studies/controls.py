"""Control directions for steering, added at the same norm as the vector they control for.

``random-S``: a Gaussian direction from seed ``S``. ``shuffled-S``: the vector's own mean difference at the
layer after swapping the labels of each contrastive pair with probability 1/2 (seed ``S``), which keeps
everything the pairs share but the trait. Both are unit-normalised by whoever adds them, so a control moves
the residual as far as the vector does and differs only in direction.
"""

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from personalab.engine.capture import capture_means
from personalab.engine.handle import ModelHandle
from personalab.methods.extraction import PAIRS, Answer, ContrastPair, answer_activations, contrast_sequences
from personalab.traits import RUN_TRAIT, load_trait_file

CONTROL_SEEDS = (0, 1, 2)


def control_directions(
    response: torch.Tensor | None, n_pairs: int, layer: int, seeds: Sequence[int], hidden: int
) -> dict[str, torch.Tensor]:
    """``random-S`` for every seed and, where ``response`` holds the response means of the pairs (``[pos...,
    neg...]``, ``[2 n_pairs, n_blocks + 1, hidden]``), ``shuffled-S``; each float32 ``[hidden]``, not normalised."""
    out = {}
    acts = response[:, layer].double() if response is not None and n_pairs > 0 else None
    for seed in seeds:
        out[f"random-{seed}"] = torch.randn(hidden, generator=torch.Generator().manual_seed(seed))
        if acts is not None:
            pos, neg = acts[:n_pairs], acts[n_pairs:]
            flip = torch.from_numpy(np.random.default_rng(seed).random(n_pairs) < 0.5).unsqueeze(1)
            shuffled = torch.where(flip, neg, pos).mean(0) - torch.where(flip, pos, neg).mean(0)
            out[f"shuffled-{seed}"] = shuffled.float()
    return out


def pair_activations(
    handle: ModelHandle, source: Path, variant: str = "response_mean", batch_size: int = 16
) -> torch.Tensor | None:
    """The ``variant`` activations (``[2 n, n_blocks + 1, hidden]``, positives first) of the pairs the extraction run
    folder of ``source`` (the folder or its ``vectors.safetensors``) kept (``pairs.jsonl``: judged pairs, or those of
    ``extract --pairs``, which have ``response_mean`` alone), captured on ``handle``; ``None`` where there are none
    (a lone vector file, a public ``.pt``)."""
    if source.is_dir():
        folder = source
    elif source.name == "vectors.safetensors":
        folder = source.parent
    else:
        return None
    path = folder / PAIRS
    if not path.is_file():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    kept = [row for row in rows if row.get("kept")]
    if not kept:
        return None
    if "given" in kept[0]:
        if variant != "response_mean":
            return None
        pairs = [ContrastPair.model_validate(row["given"]) for row in kept]
        (means,) = capture_means(handle, contrast_sequences(handle, pairs), ["response"], batch_size=batch_size)
        return means
    style = load_trait_file(folder / RUN_TRAIT).elicitation if (folder / RUN_TRAIT).is_file() else "system_prompt"
    answers = [
        Answer(row["question"], row[f"{side}_instruction"], row["pair"], row["sample"], side, row[f"{side}_text"],
               row[f"{side}_trait"], row[f"{side}_coherence"], style)
        for side in ("pos", "neg") for row in kept
    ]  # fmt: skip
    return answer_activations(handle, answers, batch_size)[variant]
