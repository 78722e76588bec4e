"""Persona vectors in SAE feature space: which features a vector is made of, and which the trait moves.

At the SAE's layer ``l`` (``personalab.sae``: ``hidden_states[l]``):

* decomposition: the cosine of the vector's row ``v = vector[l]`` with every decoder direction ``W_dec[f]``; the
  ``k`` largest of each sign; the least-squares weights ``w`` of ``v`` on those ``2k`` directions and the share of
  ``|v|^2`` they reconstruct, ``1 - |v - D w|^2 / |v|^2`` (``D``: the chosen rows as columns);
* activations: every response token of the extraction run's kept pairs (the stored answers, each encoded in its
  prompt as the run asked it), encoded by the SAE and averaged per answer; per question, the mean over its pairs of
  positive minus negative; per feature the mean of that over questions, and for the ``tested`` features with the
  largest absolute difference a two-sided question-level sign-flip test, Bonferroni-corrected over all ``d_sae``
  features (the ones left untested count as tested);
* a fine-tune's diff: the same texts (records' responses, or the base model's greedy answers) read by the base and
  the tuned model; per record, each model's mean activation over the chosen tokens, tuned minus base; per feature
  the mean over records, a record-level sign-flip test of the ``tested`` largest and Bonferroni as above, and each
  feature's cosine with a persona vector.
"""

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch

from personalab.console import progress_bar
from personalab.engine.capture import capture
from personalab.engine.chat import TokenSequence
from personalab.engine.generation import SamplingParams
from personalab.engine.handle import ModelHandle, check_same_shape
from personalab.engine.layers import check_vector
from personalab.errors import InvalidInputError
from personalab.figures.plots import plot_features, short_name
from personalab.figures.tables import markdown_table, write_csv
from personalab.files import write_text
from personalab.hashes import content_key, vector_sha256
from personalab.records import Record
from personalab.runfolder import claim, model_settings
from personalab.sae import SAE
from personalab.store import Store
from personalab.studies.monitor import own_answers
from personalab.studies.stats import bonferroni, sign_flip_test, smallest_sign_flip_p
from personalab.traits.elicitation import elicit

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
    cosine = sae.cosines(v)
    k = min(k, sae.d_sae)
    chosen = torch.cat([cosine.topk(k).indices, (-cosine).topk(k).indices]).unique()
    basis = sae.W_dec[chosen].T.double()
    weights = torch.linalg.lstsq(basis, v.double().unsqueeze(1)).solution.squeeze(1)
    share = 1.0 - float((v.double() - basis @ weights).square().sum() / v.double().square().sum())
    table = pd.DataFrame({"feature": chosen.tolist(), "cosine": cosine[chosen].tolist(), "weight": weights.tolist()})
    return table.sort_values("cosine", ascending=False, ignore_index=True), share


def feature_means(
    handle: ModelHandle,
    sae: SAE,
    sequences: Sequence[TokenSequence],
    positions: str = "response",
    batch_size: int = 16,
    progress: bool = True,
    label: str = "encode",
) -> torch.Tensor:
    """Per sequence, the mean SAE activation over its ``positions`` tokens at the SAE's layer: float64
    ``[n_sequences, d_sae]``, NaN for a sequence with no such token. Streams ``batch_size`` sequences at a time."""
    means = torch.full((len(sequences), sae.d_sae), float("nan"), dtype=torch.float64)
    with progress_bar(label, len(sequences), progress) as advance:
        for start in range(0, len(sequences), batch_size):
            chunk = sequences[start : start + batch_size]
            acts = capture(handle, chunk, [sae.layer], positions, reduce="gather", batch_size=batch_size)
            for row, tokens in enumerate(acts, start):
                if tokens.shape[1]:
                    means[row] = sae.encode(tokens[0]).mean(0).double()
            advance(len(chunk))
    return means


def _floor_note(units: int, what: str, d_sae: int) -> str:
    """A line saying the smallest p-value a sign-flip test over ``units`` can reach, before and after Bonferroni."""
    floor = smallest_sign_flip_p(units)
    corrected = bonferroni(floor, d_sae)
    return f"- with {units} {what} the smallest sign-flip p is {floor:.3g} ({corrected:.3g} after Bonferroni)"


def _ranked(per_unit: torch.Tensor, d_sae: int, tested: int) -> pd.DataFrame:
    """Features by ``|difference|`` (the mean over units of ``per_unit [n_units, d_sae]``), with the sign-flip
    p-value over units of the ``tested`` largest (``p_raw``) and Bonferroni over all ``d_sae`` (``p``)."""
    difference = per_unit.mean(0).numpy()
    order = abs(difference).argsort(kind="stable")[::-1]
    table = pd.DataFrame({"feature": order, "difference": difference[order]})
    p_raw = [sign_flip_test(per_unit[:, f].tolist()) for f in order[:tested]]
    table["p_raw"] = p_raw + [float("nan")] * (len(order) - len(p_raw))
    table["p"] = [bonferroni(p, d_sae) for p in table["p_raw"]]
    return table


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
    seqs = [
        elicit(handle, style, p[f"{side}_instruction"], p["question"], p[f"{side}_text"])
        for p in pairs
        for side in ("pos", "neg")
    ]
    means = feature_means(handle, sae, seqs, "response", batch_size, progress, "encode answers")
    sums = torch.zeros(2, len(questions), sae.d_sae, dtype=torch.float64)
    counts = torch.zeros(2, len(questions), 1, dtype=torch.float64)
    for row, mean in enumerate(means):
        if not mean.isnan().any():
            side, question = row % 2, index[pairs[row // 2]["question"]]
            sums[side, question] += mean
            counts[side, question] += 1
    both = (counts > 0).all(0).squeeze(1)
    per_question = sums[0, both] / counts[0, both] - sums[1, both] / counts[1, both]
    table = _ranked(per_question, sae.d_sae, tested)
    table.attrs["questions"] = int(both.sum())
    return table


def model_differences(
    base: ModelHandle,
    tuned: ModelHandle,
    sae: SAE,
    records: Sequence[Record],
    positions: str = "response",
    tested: int = TESTED,
    batch_size: int = 16,
    progress: bool = True,
) -> pd.DataFrame:
    """Per feature, the mean over ``records`` (each with a response) of the tuned model's mean activation on the
    record's ``positions`` tokens minus the base model's on the same text (``difference``; ``base`` and ``tuned``
    the two means), each model encoding the record with its own tokenizer; the sign-flip p-value over records of
    the ``tested`` largest ``|difference|`` (``p_raw``; ``p`` Bonferroni over every feature). One row per
    feature, by ``|difference|``."""
    check_same_shape(base, tuned)
    means = [
        feature_means(
            handle,
            sae,
            [r.encode(handle) for r in records],
            positions,
            batch_size,
            progress,
            f"encode with {name}",
        )
        for name, handle in (("base", base), ("tuned", tuned))
    ]
    both = ~(means[0].isnan().any(1) | means[1].isnan().any(1))
    if not both.any():
        raise InvalidInputError(f"no record has {positions} tokens to encode; pass records with responses")
    table = _ranked(means[1][both] - means[0][both], sae.d_sae, tested)
    for name, mean in zip(("base", "tuned"), means, strict=True):
        table.insert(table.columns.get_loc("difference"), name, mean[both].mean(0).numpy()[table["feature"]])
    table.attrs["records"] = int(both.sum())
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
        "mode": "vector",
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
        lines.append(_floor_note(diffs.attrs["questions"], "questions", sae.d_sae))
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


def run_feature_diff(
    base: ModelHandle,
    tuned: ModelHandle,
    sae: SAE,
    out: Path,
    records: Sequence[Record],
    vector: torch.Tensor | None = None,
    variant: str = "",
    positions: str = "response",
    labels: dict[int, str] | None = None,
    k: int = 10,
    max_new_tokens: int = 128,
    data: Path | None = None,
    batch_size: int = 16,
    progress: bool = True,
) -> pd.DataFrame:
    """Write ``features.csv`` (every feature by ``|tuned - base|`` mean activation on ``records``, see
    ``model_differences``, with its cosine to ``vector [n_blocks + 1, hidden]`` at the SAE's layer when given),
    ``features.md`` (the ``k`` largest changes of each sign) and ``features.png`` into ``out``; returns the table.
    A record without a response is answered by the base model, greedily, kept in ``generations.sqlite``."""
    labels = labels or {}
    row = None
    if vector is not None:
        row = check_vector(vector, sae.layer, base.n_blocks, base.hidden_size).float()
        if not row.norm() > 0:
            raise InvalidInputError(f"the vector is zero at layer {sae.layer}, the SAE's; extract it again")
    settings = {
        **model_settings(base),
        "mode": "diff",
        "tuned": model_settings(tuned),
        "sae": sae.source,
        "sae_layer": sae.layer,
        "positions": positions,
        "vector": vector_sha256(vector) if vector is not None else None,
        "variant": variant if vector is not None else None,
        "top_k": k,
        "max_new_tokens": max_new_tokens,
        "inputs_sha256": content_key([r.content() for r in records]),
    }
    run = claim(out, "features", settings, inputs={"data": data}, prompt_format=base.chat.describe())
    unanswered = [r for r in records if r.response is None]
    if unanswered:
        params = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens)
        with Store(out / "generations.sqlite") as store:
            answers = iter(own_answers(base, unanswered, store, params, batch_size, progress, "base answers"))
        records = [r if r.response is not None else replace(r, response=next(answers)) for r in records]
    table = model_differences(base, tuned, sae, records, positions, batch_size=batch_size, progress=progress)
    if row is not None:
        table["cosine"] = sae.cosines(row)[torch.tensor(table["feature"].tolist())].tolist()
    table["label"] = [labels.get(int(f), "") for f in table["feature"]]
    write_csv(table, out / "features.csv")
    shown = pd.concat([table[table["difference"] > 0].head(k), table[table["difference"] < 0].head(k)])
    shown = shown.sort_values("difference", ascending=False, ignore_index=True)
    given = len(records) - len(unanswered)
    lines = [
        f"# Features {tuned.name} moved against {base.name}, in {sae.source}",
        "",
        f"- SAE: {sae.architecture}, {sae.d_sae} features, reads {sae.hook_name} (layer {sae.layer})",
        f"- difference: tuned - base mean activation on the {positions} tokens of {table.attrs['records']} records "
        f"({given} responses from the data, {len(unanswered)} the base model's greedy answers), each model reading "
        f"the same text; p: sign-flip over records, Bonferroni over {sae.d_sae}",
        _floor_note(table.attrs["records"], "records", sae.d_sae),
    ]
    if vector is not None:
        lines.append(f"- cosine: of the feature's decoder direction with the {variant} vector at layer {sae.layer}")
    formats = {"base": ".3g", "tuned": ".3g", "difference": "+.3g", "p": ".3g", "cosine": "+.3f"}
    lines += ["", f"## The {k} largest changes of each sign", "", markdown_table(shown.drop(columns="p_raw"), formats)]
    write_text(out / "features.md", "\n".join(lines) + "\n")
    names = [f"{f} {label}".strip() for f, label in zip(shown["feature"], shown["label"], strict=True)]
    plot_features(
        names, shown["cosine"].tolist() if vector is not None else None, shown["difference"].tolist(),
        f"{short_name(tuned.name)} - {short_name(base.name)} in {sae.d_sae} features", out / "features.png",
        difference_label="mean activation difference (tuned - base)",
    )  # fmt: skip
    run.write(counts={"rows": len(table), "records": table.attrs["records"], "base_answers": len(unanswered)})
    return table
