"""Peak memory of one distillation training step: chunked KL(teacher || student) vs plain cross-entropy.

Each mode runs in a fresh process on a random Llama (8 x 512, vocabulary 32k) with a LoRA
rank-8 student, batch 2 x 256 tokens (192 response tokens each). On CPU the figure is
the growth of the peak resident set (VmHWM) over the resident set after loading; on CUDA
it is ``torch.cuda.max_memory_allocated`` over the allocation after loading.
Run: ``python benchmarks/bench_distill_memory.py``.
"""

import subprocess
import sys

import torch


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field))


def step(mode: str) -> float:
    """One optimizer step in ``mode`` ("kl" or "ce"); returns the peak memory growth in MiB."""
    from peft import LoraConfig, get_peft_model
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from personalab.engine.batching import pad_batch
    from personalab.engine.chat import TokenSequence
    from personalab.engine.handle import ModelHandle
    from personalab.methods.distill import DistillConfig, TeacherStudent

    from common import random_llama

    cuda = torch.cuda.is_available()
    model = random_llama()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 0}, "<pad>")))
    tokenizer.pad_token = "<pad>"
    handle = ModelHandle.from_model(model, tokenizer, name="random")
    seqs = [TokenSequence(tuple(torch.randint(1, 32000, (256,)).tolist()), 64) for _ in range(2)]
    student = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear"))
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-4)
    pair = TeacherStudent(handle, student, handle, torch.randn(512), DistillConfig(layer=4, alpha=4.0))
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_kib("VmRSS:")
    if mode == "kl":
        loss = pair.kl(seqs)
    else:
        batch = pad_batch([s.ids for s in seqs], 0, "right", handle.input_device)
        labels = batch.input_ids.clone()
        labels[:, :64] = -100
        loss = student(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels).loss
    loss.backward()
    optimizer.step()
    if cuda:
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    return (_rss_kib("VmHWM:") - base) / 1024


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--mode":
        print(step(sys.argv[2]))
        return
    peaks = {}
    for mode in ("ce", "kl"):
        out = subprocess.run([sys.executable, __file__, "--mode", mode], capture_output=True, text=True, check=True)
        peaks[mode] = float(out.stdout.strip().splitlines()[-1])
    where = "CUDA allocated" if torch.cuda.is_available() else "CPU peak RSS"
    print(f"one training step, {where} growth over the loaded model:")
    ratio = peaks["kl"] / peaks["ce"]
    print(f"  plain cross-entropy            {peaks['ce']:8.1f} MiB")
    print(f"  chunked KL (teacher + student) {peaks['kl']:8.1f} MiB   ratio {ratio:.2f}x (target <= 1.3x)")


if __name__ == "__main__":
    main()
