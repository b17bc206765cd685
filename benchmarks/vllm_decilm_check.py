"""The DeciLM export run by vLLM itself (a GPU lane: vLLM's wheel needs CUDA; not run on this project's CPU machine).

SmolLM2-135M with BlockPruner's sub-layers removed at the FLOPs of 4 blocks (the removal the ``llm_depth`` experiment
found, as ``benchmarks/experiments/llama_cpp.json`` names it) is exported with ``hf_collapse.export.export(...,
format="decilm")`` (checked there in llama.cpp), then loaded by ``vllm.LLM(..., trust_remote_code=True)`` (its
``nemotron_nas`` model) and compared with PyTorch on held-out BBC News text: the log-probability of every prompt token
(``prompt_logprobs``) and 32 greedy tokens. Prints pass / fail; exits 1 on a failure.

    pip install vllm && python benchmarks/vllm_decilm_check.py
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch
from kinds.smollm2_depth import rebuild_removal
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_collapse.data import embedded_model_path, load_bbc_news
from hf_collapse.export import export


def main() -> int:
    from vllm import LLM, SamplingParams

    removals = json.loads((Path(__file__).parent / "experiments" / "llama_cpp.json").read_text())["base"]["removals"]
    units = removals["sub-layers (BlockPruner, 4 blocks' FLOPs)"]
    folder = embedded_model_path("smollm2")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    smaller = rebuild_removal(AutoModelForCausalLM.from_pretrained(folder), units).eval()
    text = load_bbc_news()["test"]["text"][0]
    ids = tokenizer(text)["input_ids"][:96]
    with tempfile.TemporaryDirectory() as scratch:
        saved, out = Path(scratch) / "hf", Path(scratch) / "decilm"
        smaller.save_pretrained(saved)
        tokenizer.save_pretrained(saved)
        report = export(saved, out, format="decilm", repeats=1)
        print(f"decilm export checked in llama.cpp: within {report.max_abs_difference:.2g} of PyTorch")
        llm = LLM(model=str(out), trust_remote_code=True, dtype="float32", enforce_eager=True)
        params = SamplingParams(max_tokens=32, temperature=0.0, prompt_logprobs=0)
        result = llm.generate({"prompt_token_ids": ids}, params)[0]
    with torch.no_grad():
        logits = smaller(torch.tensor([ids])).logits[0].float()
    expected = torch.log_softmax(logits, -1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    got = torch.tensor([next(iter(p.values())).logprob for p in result.prompt_logprobs[1:]])
    difference = float((got - expected).abs().max())
    greedy = smaller.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)[0, len(ids) :].tolist()
    same = sum(a == b for a, b in zip(greedy, result.outputs[0].token_ids))
    checks = {
        f"prompt log-probabilities within 1e-3 of PyTorch's (largest difference {difference:.2g})": difference <= 1e-3,
        f"greedy continuation: {same}/32 tokens the same as PyTorch's": same >= 30,
    }
    for name, ok in checks.items():
        print(("pass " if ok else "FAIL ") + name)
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
