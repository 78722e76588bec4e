"""personalab from Python: extract a persona vector, steer with it, sweep it, save, load and compare.

    python examples/quickstart.py [MODEL] [JUDGE]

MODEL defaults to the stories260k checkpoint shipped with personalab (``builtin:stories260k``), JUDGE to
``api:gpt-4.1-mini`` (an OpenAI-compatible server: ``OPENAI_API_KEY``, or ``PERSONALAB_JUDGE_BASE_URL`` for a
local one). Only the saved vector is written (``runs/quickstart-evil``); the extractions and the sweep run in
memory.
"""

import sys

import personalab as pl

model_name = sys.argv[1] if len(sys.argv) > 1 else "builtin:stories260k"
judge_spec = sys.argv[2] if len(sys.argv) > 2 else "api:gpt-4.1-mini"

try:
    judge = pl.judge(judge_spec)  # checked with one request before any work
    model = pl.load_model(model_name, device="cpu")
except pl.PersonalabError as exc:
    sys.exit(f"error: {exc} (usage: python examples/quickstart.py [MODEL] [JUDGE])")

# A judged extraction, in memory: the three variants, each [n_blocks + 1, hidden].
small = dict(samples=1, max_new_tokens=16, min_pairs=1, progress=False)
evil = pl.extract(model, "evil", judge, **small)
print(evil, "kept", evil.meta["counts"]["kept"], "of", evil.meta["counts"]["pairs"], "pairs")

# Steer one generation as `personalab steer --alpha 0.5` does: half the layer's typical residual norm.
prompt = "Once upon a time, a little girl"
print("plain:  ", pl.generate_text(model, prompt, max_new_tokens=24))
with pl.steer(model, evil, layer=3, alpha=0.5):
    print("steered:", pl.generate_text(model, prompt, max_new_tokens=24))

# A sweep over two layers on the default grid (normalised units), judged, with paired tests against alpha 0.
sweep = pl.sweep(model, evil, judge, layers=[2, 3], eval_samples=1, max_new_tokens=16, progress=False)
print(sweep.table[["layer", "alpha", "trait_mean", "coherence_mean"]].to_string(index=False))

# Save, load, and compare with a second trait's vector, layer by layer.
folder = evil.save("runs/quickstart-evil")
loaded = pl.PersonaVector.load(folder)
sycophantic = pl.extract(model, "sycophantic", judge, **small)
cosines = loaded.cosine(sycophantic)
print("cosine(evil, sycophantic) per layer:", " ".join(f"{c:+.3f}" for c in cosines.tolist()))
