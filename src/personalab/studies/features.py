"""Persona vectors in SAE feature space: which features a vector is made of, and which the trait moves.

At the SAE's layer ``l`` (``personalab.sae``: ``hidden_states[l]``):

* decomposition: the cosine of the vector's row ``v = vector[l]`` with every decoder direction ``W_dec[f]``; the
  ``k`` largest of each sign; the least-squares weights ``w`` of ``v`` on those ``2k`` directions and the share of
  ``|v|^2`` they reconstruct, ``1 - |v - D w|^2 / |v|^2`` (``D``: the chosen rows as columns);
* activations: every response token of the extraction run's kept pairs (the stored answers, each encoded in its
  prompt as the run asked it), encoded by the SAE and averaged per answer; per question, the mean over its pairs of
  positive minus negative; per feature the mean of that over questions, and for the ``tested`` features with the
  largest absolute difference a two-sided question-level sign-flip test, Bonferroni-corrected over all ``d_sae``
  features (the ones left untested count as tested).
"""

from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch

from personalab.console import progress_bar
from personalab.engine.capture import capture
from personalab.engine.model import ModelHandle
from personalab.errors import InvalidInputError
from personalab.figures.plots import plot_features
from personalab.figures.tables import markdown_table, write_csv
from personalab.files import write_text
from personalab.runfolder import claim, model_settings
from personalab.sae import SAE
from personalab.studies.stats import bonferroni, sign_flip_test
from personalab.traits.elicitation import elicit
from personalab.vectors import vector_sha256

TESTED = 100
"""Features given a sign-flip test: those with the largest absolute activation difference."""


def decompose(vector: torch.Tensor, sae: SAE, k: int = 10) -> tuple[pd.DataFrame, float]:
    """``(table, share)``: the ``k`` features of each sign with the largest cosine to ``vector [d_in]`` (columns
    ``feature``, ``cosine``, ``weight``: its least-squares weight), by cosine descending, and the share of
    ``|vector|^2`` the chosen directions reconstruct."""
    v = vector.float()
    if v.shape != (sae.d_in,):
        raise InvalidInputError(f"the vector has shape {tuple(v.shape)}; the SAE reads [{sae.d_in}]")
    if not v.norm() > 0:
        raise InvalidInputError(f"the vector is zero at layer {sae.layer}; extract it again or pick another layer")
    if k < 1:
        raise InvalidInputError(f"`top_k` is {k}; give a positive number of features")
    decoder = sae.W_dec.float()
    cosine = decoder @ v / (decoder.norm(dim=1) * v.norm()).clamp(min=1e-12)
    k = min(k, sae.d_sae)
    chosen = torch.cat([cosine.topk(k).indices, (-cosine).topk(k).indices]).unique()
    basis = decoder[chosen].T.double()
    weights = torch.linalg.lstsq(basis, v.double().unsqueeze(1)).solution.squeeze(1)
    share = 1.0 - float((v.double() - basis @ weights).square().sum() / v.double().square().sum())
    table = pd.DataFrame({"feature": chosen.tolist(), "cosine": cosine[chosen].tolist(), "weight": weights.tolist()})
    return table.sort_values("cosine", ascending=False, ignore_index=True), share


def activation_differences(
    handle: ModelHandle,
    sae: SAE,
    pairs: Sequence[dict],
    style: str,
    tested: int = TESTED,
    batch_size: int = 16,
    progress: bool = True,
) -> pd.DataFrame:
    """Per feature, the question-level mean of positive minus negative answers' mean activation (``difference``),
    and for the ``tested`` largest ``|difference|`` the sign-flip p-value (``p_raw``; ``p`` Bonferroni over every
    feature); ``pairs`` are kept extraction pairs (``question``, ``pos_instruction``, ``pos_text``,
    ``neg_instruction``, ``neg_text``), asked in ``style``. One row per feature, by ``|difference|``."""
    if not pairs:
        raise InvalidInputError("no kept pairs to encode; extract with more samples or lower thresholds")
    questions = sorted({p["question"] for p in pairs})
    index = {q: i for i, q in enumerate(questions)}
    sums = torch.zeros(2, len(questions), sae.d_sae, dtype=torch.float64)
    counts = torch.zeros(2, len(questions), 1, dtype=torch.float64)
    answers = [(side, p) for p in pairs for side in (0, 1)]
    with progress_bar("encode answers", len(answers), progress) as advance:
        for start in range(0, len(answers), batch_size):
            chunk = answers[start : start + batch_size]
            seqs = [
                elicit(handle, style, p["pos_instruction" if s == 0 else "neg_instruction"], p["question"],
                       p["pos_text" if s == 0 else "neg_text"])
                for s, p in chunk
            ]  # fmt: skip
            acts = capture(handle, seqs, [sae.layer], "response", reduce="gather", batch_size=batch_size)
            for (side, pair), tokens in zip(chunk, acts, strict=True):
                if tokens.shape[1]:
                    sums[side, index[pair["question"]]] += sae.encode(tokens[0]).mean(0).double()
                    counts[side, index[pair["question"]]] += 1
            advance(len(chunk))
    both = (counts > 0).all(0).squeeze(1)
    means = sums[:, both] / counts[:, both]
    per_question = (means[0] - means[1]).numpy()
    difference = per_question.mean(0)
    order = abs(difference).argsort()[::-1]
    table = pd.DataFrame({"feature": order, "difference": difference[order]})
    p_raw = [sign_flip_test(per_question[:, f].tolist()) for f in order[:tested]]
    table["p_raw"] = p_raw + [float("nan")] * (len(order) - len(p_raw))
    table["p"] = [bonferroni(p, sae.d_sae) if p == p else float("nan") for p in table["p_raw"]]
    table.attrs["questions"] = int(both.sum())
    return table


def run_features(
    handle: ModelHandle | None,
    vectors: dict[str, torch.Tensor],
    sae: SAE,
    out: Path,
    pairs: Sequence[dict] = (),
    style: str = "system_prompt",
    labels: dict[int, str] | None = None,
    k: int = 10,
    trait: str = "",
    progress: bool = True,
) -> pd.DataFrame:
    """Write ``features.csv`` (per variant of ``vectors`` ``[n_blocks + 1, hidden]``: its top features by cosine,
    their least-squares weights, and the activation difference and p-value of each where ``pairs`` are given),
    ``features.md`` (the top-k table of each variant, the share it reconstructs) and ``features.png`` into ``out``;
    returns the table. Without a model or pairs only the decomposition is written."""
    labels = labels or {}
    settings = {
        **(model_settings(handle) if handle is not None else {}),
        "sae": sae.source,
        "sae_layer": sae.layer,
        "vectors": {name: vector_sha256(v) for name, v in vectors.items()},
        "top_k": k,
        "pairs": len(pairs),
    }
    run = claim(out, "features", settings)
    diffs = None
    if handle is not None and pairs:
        diffs = activation_differences(handle, sae, pairs, style, progress=progress).set_index("feature")
    frames, lines = [], [f"# {trait or 'Persona vector'} in the features of {sae.source}", ""]
    lines.append(f"- SAE: {sae.architecture}, {sae.d_sae} features, reads {sae.hook_name} (layer {sae.layer})")
    if diffs is not None:
        lines.append(
            f"- activation difference: positive - negative answers of {len(pairs)} kept pairs over "
            f"{diffs.attrs.get('questions', '?')} questions; p: sign-flip over questions, Bonferroni over {sae.d_sae}"
        )
    for name, vector in vectors.items():
        table, share = decompose(vector[sae.layer], sae, k)
        table.insert(0, "variant", name)
        table["label"] = [labels.get(int(f), "") for f in table["feature"]]
        if diffs is not None:
            table["difference"] = [float(diffs.loc[f, "difference"]) for f in table["feature"]]
            table["p"] = [float(diffs.loc[f, "p"]) for f in table["feature"]]
        frames.append(table)
        shown = table.drop(columns="variant")
        formats = {"cosine": "+.3f", "weight": "+.3g", "difference": "+.3g", "p": ".3g"}
        lines += ["", f"## {name}: the top {k} of each sign reconstruct {share:.1%} of |v|^2", ""]
        lines.append(markdown_table(shown, formats))
    result = pd.concat(frames, ignore_index=True)
    write_csv(result, out / "features.csv")
    shown = next(iter(vectors))
    main = result[result["variant"] == shown]
    names = [f"{f} {label}".strip() for f, label in zip(main["feature"], main["label"], strict=True)]
    differences = main["difference"].tolist() if "difference" in main else [float("nan")] * len(main)
    plot_features(names, main["cosine"].tolist(), differences, f"{shown} in {sae.d_sae} features",
                  out / "features.png")  # fmt: skip
    write_text(out / "features.md", "\n".join(lines) + "\n")
    run.write(counts={"rows": len(result)})
    return result
