"""SmolLM2-135M where small models are served: llama.cpp, original and smaller side by side.

Models: the original; 8 of 30 blocks removed by SLEB (the removal bench_llm_depth chose on validation windows), as it
is and healed with LoRA on BBC News training windows (``--heal_minutes``); BlockPruner's attention / MLP sub-layers
removed down to the FLOPs of 4 blocks (the DeciLM layout, llama.cpp architecture ``deci``). The removals are rebuilt
from ``bench_llm_depth.json`` (its ``removed`` lists), not searched again.

Each is exported by ``hf_collapse.export`` (llama.cpp's own converter; the f32 file checked against PyTorch), then
quantized by llama.cpp to f16, q8_0 and q4_k_m. Measured in llama.cpp (llama-cpp-python, 1 thread, the models
interleaved, median of ``--rounds``):

* max |logit difference| from PyTorch on 4 held-out BBC News windows, f32 file and f32 KV cache (target <= 1e-3);
* perplexity on held-out windows of BBC News (test articles) and Wikipedia (test sections), text no step saw,
  with llama.cpp's default f16 KV cache, for every file type (targets: q8_0 within 1% of f16, q4_k_m within 5%);
* prompt tokens/s (a 128-token window) and generation tokens/s (64 greedy tokens after a 16-token prompt), beside the
  FLOPs ratio (target: smaller / original >= 0.9 x the FLOPs ratio, f16 and q4_k_m);
* the file sizes, and the question a llama.cpp user asks first: against the original quantized to a file no larger,
  or as fast, does removal + healing give a better perplexity, or does quantization alone win?

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_llama_cpp.py  # writes results/bench_llama_cpp.{txt,json}
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from bench_llm_depth import SETTINGS, TimeBudget, rebuild_removal, training_arguments  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

import hf_collapse  # noqa: E402
from hf_collapse.data import embedded_model_path, lm_windows, load_bbc_news, load_wiki  # noqa: E402
from hf_collapse.export import export  # noqa: E402
from hf_collapse.export.llama_cpp import llama_cpp_version, logits_runner, quantize  # noqa: E402
from hf_collapse.metrics import forward_flops, hardware_description  # noqa: E402

TYPES = ("f16", "q8_0", "q4_k_m")
RESULTS = Path("benchmarks/results")


def nll(logits: np.ndarray, ids: list[int]) -> tuple[float, int]:
    """Summed negative log-likelihood of ``ids[1:]`` under ``logits`` (one row per position) and the token count."""
    rows = logits[:-1].astype(np.float64)
    rows -= rows.max(axis=1, keepdims=True)
    log_probs = rows - np.log(np.exp(rows).sum(axis=1, keepdims=True))
    return float(-log_probs[np.arange(len(ids) - 1), ids[1:]].sum()), len(ids) - 1


def llama_cpp_perplexity(path: Path, windows: list[list[int]]) -> float:
    run = logits_runner(path, threads=2, f32_cache=False)  # llama.cpp's defaults: what a user's server computes
    total, count = 0.0, 0
    for ids in windows:
        loss, n = nll(run({"input_ids": np.array([ids])})[0][0], ids)
        total, count = total + loss, count + n
    return float(np.exp(total / count))


def pytorch_perplexity(model, windows: list[list[int]]) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in windows:
            loss, n = nll(model(torch.tensor([ids])).logits[0].numpy(), ids)
            total, count = total + loss, count + n
    return float(np.exp(total / count))


def speed(path: Path, prompt: list[int], window: list[int], new_tokens: int) -> tuple[float, float]:
    """(prompt tokens/s on ``window``, generation tokens/s of ``new_tokens`` greedy tokens after ``prompt``), 1
    thread, only the last position's logits (as a server computes them)."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=512, n_threads=1, n_threads_batch=1, verbose=False)
    llm.reset()
    start = time.perf_counter()
    llm.eval(window)
    prompt_speed = len(window) / (time.perf_counter() - start)
    generated = 0
    for token in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
        if generated == 0:
            start = time.perf_counter()  # the prompt is processed before the first token comes
        generated += 1
        if generated > new_tokens or token == llm.token_eos():
            break
    generation_speed = (generated - 1) / (time.perf_counter() - start)
    llm.close()
    return prompt_speed, generation_speed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--heal_minutes", type=float, default=9.0)
    parser.add_argument("--windows", type=int, default=16, help="held-out windows of each corpus for perplexity")
    parser.add_argument("--rounds", type=int, default=3, help="timing rounds (models interleaved; median)")
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument(
        "--work", default=str(RESULTS / "_llama_cpp"), help="exports and the healed model (not committed)"
    )
    opts = parser.parse_args()
    torch.manual_seed(0)
    work = Path(opts.work)
    work.mkdir(parents=True, exist_ok=True)
    depth_rows = json.loads((RESULTS / "bench_llm_depth.json").read_text())["rows"]
    removals = {
        "8 blocks (SLEB)": depth_rows["8 removed/sleb"]["removed"],
        "sub-layers (BlockPruner, 4 blocks' FLOPs)": depth_rows["4 removed/blockpruner_per_flop (same FLOPs)"][
            "removed"
        ],
    }
    folder = embedded_model_path("smollm2")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    original = AutoModelForCausalLM.from_pretrained(folder).eval()
    news, wiki = load_bbc_news(), load_wiki()

    def windows(texts, count):
        return [list(map(int, w["input_ids"])) for w in lm_windows(texts, tokenizer, max_length=128, max_windows=count)]

    held_out = {
        "A bbc_news": windows(news["test"]["text"], opts.windows),
        "B wiki": windows(wiki["test"]["text"], opts.windows),
    }
    probe = {"input_ids": torch.tensor([held_out["A bbc_news"][0]])}

    models = {"original": original}
    for name, units in removals.items():
        models[name] = rebuild_removal(original, units).eval()
    healed_folder = work / "healed-8-blocks"
    if not (healed_folder / "config.json").is_file():
        settings = dict(SETTINGS["lora"])
        budget = TimeBudget(60 * opts.heal_minutes)
        training = lm_windows(news["train"]["text"], tokenizer, max_length=128, max_windows=6000)
        healed = hf_collapse.heal(
            rebuild_removal(original, removals["8 blocks (SLEB)"]),
            None,
            training,
            method="lora",
            args=training_arguments(str(work / "_heal"), settings.pop("learning_rate")),
            callbacks=[budget],
            **settings,
        )
        healed.save_pretrained(healed_folder)
        (healed_folder / "heal.json").write_text(json.dumps({"steps": budget.steps, "minutes": opts.heal_minutes}))
    models["8 blocks (SLEB) + LoRA heal"] = hf_collapse.AutoCollapsedModel.from_pretrained(healed_folder).eval()
    heal_steps = json.loads((healed_folder / "heal.json").read_text())["steps"]

    results: dict = {
        "setup": {
            "llama.cpp": f"llama-cpp-python {llama_cpp_version()} (built with GGML_NATIVE=OFF: AVX2, no AMX)",
            "hardware": hardware_description(original),
            "timing": "1 thread, models interleaved, median of rounds",
            "windows": f"{opts.windows} held-out windows of 128 tokens per corpus",
            "heal": f"LoRA r=16 on BBC News training windows, {opts.heal_minutes:g} min ({heal_steps} steps)",
        },
        "models": {},
    }
    base_flops = forward_flops(original, probe)
    files: dict[str, dict[str, Path]] = {}
    for name, model in models.items():
        slug = name.split(" (")[0].replace(" ", "-") + ("-healed" if "heal" in name else "")
        saved, out = work / f"{slug}-hf", work / f"{slug}-gguf"
        model.save_pretrained(saved)
        tokenizer.save_pretrained(saved)
        start = time.perf_counter()
        report = export(saved, out, format="gguf", quantize="f32", repeats=1)
        f32 = out / "model-f32.gguf"
        check = logits_runner(f32, threads=2)  # f32 file, f32 KV cache, against PyTorch on held-out text
        with torch.no_grad():
            worst = max(
                float(
                    np.abs(
                        check({"input_ids": np.array([ids])})[0][0] - model(torch.tensor([ids])).logits[0].numpy()
                    ).max()
                )
                for ids in held_out["A bbc_news"][:4]
            )
        files[name] = {"f32": f32}
        for type_name in TYPES:
            files[name][type_name] = quantize(f32, out / f"model-{type_name}.gguf", type_name)
        entry = {
            "export seconds (f32 checked + 3 quantizations)": round(time.perf_counter() - start, 1),
            "architecture": "deci" if any("Deci" in n for n in report.notes) else "llama",
            "max |logit diff| f32 (4 held-out windows)": worst,
            "flops ratio": round(base_flops / forward_flops(model, probe), 3),
            "pytorch ppl": {c: round(pytorch_perplexity(model, w), 3) for c, w in held_out.items()},
            "types": {},
        }
        for type_name in TYPES:
            path = files[name][type_name]
            entry["types"][type_name] = {
                "MiB": round(path.stat().st_size / 2**20, 1),
                "ppl": {c: round(llama_cpp_perplexity(path, w), 3) for c, w in held_out.items()},
            }
        results["models"][name] = entry
        print(name, json.dumps(entry), flush=True)

    timings: dict = {name: {t: [] for t in TYPES} for name in models}
    window, prompt = held_out["A bbc_news"][1], held_out["A bbc_news"][2][:16]
    for _ in range(opts.rounds):
        for type_name in TYPES:
            for name in models:
                timings[name][type_name].append(speed(files[name][type_name], prompt, window, opts.new_tokens))
    for name in models:
        for type_name in TYPES:
            runs = timings[name][type_name]
            results["models"][name]["types"][type_name].update(
                {
                    "prompt tok/s": round(statistics.median(r[0] for r in runs), 1),
                    "generation tok/s": round(statistics.median(r[1] for r in runs), 1),
                }
            )
    # the command a user runs on what `hf-collapse prune` saved: to q4_k_m, the one-time llama.cpp build aside
    start = time.perf_counter()
    command = ["hf-collapse", "export", str(work / "8-blocks-healed-hf"), "--format", "gguf", "--quantize", "q4_k_m"]
    done = subprocess.run(
        [str(Path(sys.executable).parent / command[0]), *command[1:], "--output", str(work / "cli-q4_k_m")],
        capture_output=True,
        text=True,
    )
    results["command"] = {
        "argv": " ".join(command),
        "seconds": round(time.perf_counter() - start, 1),
        "returncode": done.returncode,
    }
    text = summarize(results)
    print(text)
    (RESULTS / "bench_llama_cpp.json").write_text(json.dumps(results, indent=1, default=str))
    (RESULTS / "bench_llama_cpp.txt").write_text(text + "\n")


def summarize(results: dict) -> str:
    models = results["models"]
    base = models["original"]["types"]
    lines = [
        "SmolLM2-135M in llama.cpp: " + "; ".join(f"{k}: {v}" for k, v in results["setup"].items()),
        "",
        "| model | file | MiB | ppl A bbc_news | ppl B wiki | prompt tok/s (x) | generation tok/s (x) | FLOPs ratio |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, entry in models.items():
        for type_name, t in entry["types"].items():
            p = t["prompt tok/s"] / base[type_name]["prompt tok/s"]
            g = t["generation tok/s"] / base[type_name]["generation tok/s"]
            lines.append(
                f"| {name} | {type_name} | {t['MiB']} | {t['ppl']['A bbc_news']:.1f} | {t['ppl']['B wiki']:.1f} | "
                f"{t['prompt tok/s']:.0f} ({p:.2f}) | {t['generation tok/s']:.0f} ({g:.2f}) | "
                f"{entry['flops ratio']:.2f} |"
            )
    lines += ["", "Checks:"]
    for name, entry in models.items():
        f16 = entry["types"]["f16"]["ppl"]
        drift = {q: max(entry["types"][q]["ppl"][c] / f16[c] - 1 for c in f16) for q in ("q8_0", "q4_k_m")}
        worst = entry["max |logit diff| f32 (4 held-out windows)"]
        lines.append(
            f"- {name} ({entry['architecture']}): f32 logits within {worst:.2g} "
            f"of PyTorch (target 1e-3); perplexity vs f16: q8_0 {drift['q8_0']:+.1%} (target 1%), q4_k_m "
            f"{drift['q4_k_m']:+.1%} (target 5%); export {entry['export seconds (f32 checked + 3 quantizations)']} s"
        )
        if name != "original":
            for type_name in ("f16", "q4_k_m"):
                g = entry["types"][type_name]["generation tok/s"] / base[type_name]["generation tok/s"]
                lines.append(
                    f"  generation speed-up {type_name}: {g:.2f}x for a FLOPs ratio of {entry['flops ratio']:.2f} "
                    f"({g / entry['flops ratio']:.2f} of it; target 0.9)"
                )
    if "command" in results:
        c = results["command"]
        lines.append(f"- `{c['argv']} --output DIR`: {c['seconds']} s (target 120 s; exit code {c['returncode']})")
    healed = models.get("8 blocks (SLEB) + LoRA heal")
    if healed:
        lines += ["", "Removal + healing against quantization alone (perplexity on held-out text, lower is better):"]
        for type_name, t in healed["types"].items():
            size_peers = [(q, o) for q, o in base.items() if o["MiB"] <= t["MiB"] * 1.02]
            speed_peers = [(q, o) for q, o in base.items() if o["generation tok/s"] >= t["generation tok/s"] * 0.98]
            for label, peers in (("no larger", size_peers), ("as fast", speed_peers)):
                if not peers:
                    lines.append(f"- healed {type_name}: no original file is {label}")
                    continue
                q, o = min(peers, key=lambda p: p[1]["ppl"]["A bbc_news"] + p[1]["ppl"]["B wiki"])
                wins = [c for c in t["ppl"] if t["ppl"][c] < o["ppl"][c]]
                verdict = "removal + healing wins on " + ", ".join(wins) if wins else "quantization alone wins"
                lines.append(
                    f"- healed {type_name} ({t['MiB']} MiB, {t['generation tok/s']:.0f} tok/s, ppl "
                    f"{t['ppl']['A bbc_news']:.1f} / {t['ppl']['B wiki']:.1f}) vs original {q} {label} "
                    f"({o['MiB']} MiB, "
                    f"{o['generation tok/s']:.0f} tok/s, ppl {o['ppl']['A bbc_news']:.1f} / {o['ppl']['B wiki']:.1f}): "
                    f"{verdict}"
                )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
