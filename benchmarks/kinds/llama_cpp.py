"""SmolLM2-135M where small models are served: llama.cpp, the original and smaller ones side by side.

Models: the original; each of ``removals`` (a name -> the units removed, in removal order, as ``llm_depth``'s
searches list them: 8 blocks by SLEB, the removal ``llm_depth`` heals, and BlockPruner's attention / MLP sub-layers
down to the FLOPs of 4 blocks, the DeciLM layout, llama.cpp architecture ``deci``); and the ``healed`` removal healed
by ``heal`` (LoRA) for ``heal_minutes`` of wall time on up to ``training_windows`` BBC News training windows.

Each is exported by ``hf_collapse.export`` (llama.cpp's own converter; the f32 file checked against PyTorch), then
quantized by llama.cpp to each of ``types``. Measured in llama.cpp (llama-cpp-python):

* max |logit difference| from PyTorch on 4 held-out BBC News windows, f32 file and f32 KV cache (target <= 1e-3);
* perplexity on ``windows`` held-out windows of ``max_length`` tokens of BBC News (test articles) and Wikipedia (test
  sections), text no step saw, with llama.cpp's default f16 KV cache (2 threads), for every file type (targets: q8_0
  within 1% of f16, q4_k_m within 5%);
* prompt tokens/s (a ``max_length``-token window) and generation tokens/s (``new_tokens`` greedy tokens after a
  16-token prompt), 1 thread, the models interleaved, median of ``rounds``, beside the FLOPs ratio (target: smaller /
  original >= 0.9 x the FLOPs ratio, f16 and q4_k_m);
* the file sizes, and the question a llama.cpp user asks first: against the original quantized to a file no larger,
  or as fast, does removal + healing give a better perplexity, or does quantization alone win?
* the command a user runs on what ``hf-collapse prune`` saved: ``hf-collapse export <healed folder> --format gguf
  --quantize q4_k_m``, timed (target <= 2 minutes; the one-time llama.cpp build aside).

The exports and the healed model are written to a temporary folder (several GB), deleted after the run.
"""

from __future__ import annotations

import time
from pathlib import Path

VERSION = 1
TIMED = True  # tokens per second in llama.cpp, the export command's time, a heal on a wall-clock budget
PERPLEXITY_THREADS = 2
CHECKED_WINDOWS = 4


# ---------------------------------------------------------------------------------------------------- measuring


def _nll(logits, ids: list[int]) -> tuple[float, int]:
    """Summed negative log-likelihood of ``ids[1:]`` under ``logits`` (one row per position) and the token count."""
    import numpy as np

    rows = logits[:-1].astype(np.float64)
    rows -= rows.max(axis=1, keepdims=True)
    log_probs = rows - np.log(np.exp(rows).sum(axis=1, keepdims=True))
    return float(-log_probs[np.arange(len(ids) - 1), ids[1:]].sum()), len(ids) - 1


def _perplexity(logits_of, windows: list[list[int]]) -> float:
    import numpy as np

    total, count = 0.0, 0
    for ids in windows:
        loss, n = _nll(logits_of(ids), ids)
        total, count = total + loss, count + n
    return float(np.exp(total / count))


def _llama_cpp_perplexity(path: Path, windows: list[list[int]]) -> float:
    """llama.cpp's defaults (f16 KV cache): what a user's server computes."""
    import numpy as np

    from hf_collapse.export.llama_cpp import logits_runner

    run = logits_runner(path, threads=PERPLEXITY_THREADS, f32_cache=False)
    return _perplexity(lambda ids: run({"input_ids": np.array([ids])})[0][0], windows)


def _pytorch_perplexity(model, windows: list[list[int]]) -> float:
    import torch

    with torch.no_grad():
        return _perplexity(lambda ids: model(torch.tensor([ids])).logits[0].numpy(), windows)


def _max_logit_difference(path: Path, model, windows: list[list[int]]) -> float:
    """The f32 file with an f32 KV cache against PyTorch."""
    import numpy as np
    import torch

    from hf_collapse.export.llama_cpp import logits_runner

    check = logits_runner(path, threads=PERPLEXITY_THREADS)
    with torch.no_grad():
        return max(
            float(
                np.abs(check({"input_ids": np.array([ids])})[0][0] - model(torch.tensor([ids])).logits[0].numpy()).max()
            )
            for ids in windows
        )


def _speed(path: Path, prompt: list[int], window: list[int], new_tokens: int) -> tuple[float, float]:
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


def _models(s: dict) -> tuple[dict, int]:
    """The models side by side (name -> model) and the healing's optimizer steps."""
    from hf_collapse.data import lm_windows, load_bbc_news

    from .smollm2_depth import rebuild_removal, smollm2, train_heal

    original, tokenizer = smollm2(s["model"])
    models = {"original": original}
    for name, units in s["removals"].items():
        models[name] = rebuild_removal(original, units).eval()
    training = lm_windows(
        load_bbc_news()["train"]["text"], tokenizer, max_length=s["max_length"], max_windows=s["training_windows"]
    )
    student = rebuild_removal(original, s["removals"][s["healed"]])
    healed, steps = train_heal(student, None, training, s["heal"], s["heal_minutes"])
    models[_healed_name(s)] = healed
    return models, steps


def _healed_name(s: dict) -> str:
    return f"{s['healed']} + {'LoRA' if s['heal'] == 'lora' else s['heal']} heal"


def _slug(s: dict, name: str) -> str:
    """The folder name of a model's exports: ``8-blocks``, ``8-blocks-healed``, ``sub-layers``, ``original``."""
    return name.split(" (")[0].replace(" ", "-") + ("-healed" if name == _healed_name(s) else "")


def _export(s: dict, name: str, model, work: Path, held_out: dict, probe: dict, base_flops: int) -> tuple[dict, dict]:
    """``model`` exported to f32 (checked against PyTorch) and quantized to each type: (its entry, type -> file)."""
    from hf_collapse.export import export
    from hf_collapse.export.llama_cpp import quantize
    from hf_collapse.metrics import forward_flops

    from .smollm2_depth import smollm2

    saved, out = work / f"{_slug(s, name)}-hf", work / f"{_slug(s, name)}-gguf"
    model.save_pretrained(saved)
    smollm2(s["model"])[1].save_pretrained(saved)
    start = time.perf_counter()
    report = export(saved, out, format="gguf", quantize="f32", repeats=1)
    f32 = out / "model-f32.gguf"
    worst = _max_logit_difference(f32, model, held_out["A bbc_news"][:CHECKED_WINDOWS])
    files = {t: quantize(f32, out / f"model-{t}.gguf", t) for t in s["types"]}
    entry = {
        "export seconds (f32 checked + quantizations)": round(time.perf_counter() - start, 1),
        "architecture": "deci" if any("Deci" in n for n in report.notes) else "llama",
        "max |logit diff| f32": worst,
        "flops ratio": round(base_flops / forward_flops(model, probe), 3),
        "pytorch ppl": {c: round(_pytorch_perplexity(model, w), 3) for c, w in held_out.items()},
        "types": {
            t: {
                "MiB": round(path.stat().st_size / 2**20, 1),
                "ppl": {c: round(_llama_cpp_perplexity(path, w), 3) for c, w in held_out.items()},
            }
            for t, path in files.items()
        },
    }
    return entry, files


def _command(work: Path, healed_folder: Path) -> dict:
    """The command a user runs on what ``hf-collapse prune`` saved: to q4_k_m, the one-time llama.cpp build aside."""
    import subprocess
    import sys

    command = ["hf-collapse", "export", str(healed_folder), "--format", "gguf", "--quantize", "q4_k_m"]
    start = time.perf_counter()
    done = subprocess.run(
        [str(Path(sys.executable).parent / command[0]), *command[1:], "--output", str(work / "cli-q4_k_m")],
        capture_output=True,
        text=True,
    )
    if done.returncode:  # a failed export is not a fast one
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    argv = " ".join(["hf-collapse", "export", "HEALED_FOLDER", *command[3:]])
    return {"argv": argv, "seconds": round(time.perf_counter() - start, 1), "returncode": done.returncode}


def run(s: dict) -> dict:
    import statistics
    import tempfile

    import torch

    from hf_collapse.data import lm_windows, load_bbc_news, load_wiki
    from hf_collapse.export.llama_cpp import llama_cpp_version
    from hf_collapse.metrics import forward_flops, hardware_description

    from .smollm2_depth import smollm2

    torch.manual_seed(0)
    original, tokenizer = smollm2(s["model"])

    def windows(texts) -> list[list[int]]:
        cut = lm_windows(texts, tokenizer, max_length=s["max_length"], max_windows=s["windows"])
        return [list(map(int, w["input_ids"])) for w in cut]

    held_out = {"A bbc_news": windows(load_bbc_news()["test"]["text"]), "B wiki": windows(load_wiki()["test"]["text"])}
    probe = {"input_ids": torch.tensor([held_out["A bbc_news"][0]])}
    base_flops = forward_flops(original, probe)
    with tempfile.TemporaryDirectory(prefix="llama_cpp_") as folder:
        work = Path(folder)
        models, steps = _models(s)
        result: dict = {
            "setup": {
                "llama.cpp": f"llama-cpp-python {llama_cpp_version()}",
                "hardware": hardware_description(original),
                "timing": f"1 thread, models interleaved, median of {s['rounds']} rounds",
                "windows": f"{s['windows']} held-out windows of {s['max_length']} tokens per corpus",
                "heal": f"LoRA r=16 on BBC News training windows, {s['heal_minutes']:g} min ({steps} steps)",
            },
            "models": {},
        }
        files = {}
        for name, model in models.items():
            result["models"][name], files[name] = _export(s, name, model, work, held_out, probe, base_flops)
        timings: dict = {name: {t: [] for t in s["types"]} for name in models}
        window, prompt = held_out["A bbc_news"][1], held_out["A bbc_news"][2][:16]
        for _ in range(s["rounds"]):
            for t in s["types"]:
                for name in models:
                    timings[name][t].append(_speed(files[name][t], prompt, window, s["new_tokens"]))
        for name, by_type in timings.items():
            for t, runs in by_type.items():
                result["models"][name]["types"][t].update(
                    {
                        "prompt tok/s": round(statistics.median(r[0] for r in runs), 1),
                        "generation tok/s": round(statistics.median(r[1] for r in runs), 1),
                    }
                )
        result["command"] = _command(work, work / f"{_slug(s, _healed_name(s))}-hf")
    return result


def smoke(s: dict) -> dict:
    """Every model and file type on 3 windows of 32 tokens, one timing round of 4 tokens, a heal of a second (the real
    SmolLM2: the exports are most of the time)."""
    removals = {name: units[:1] for name, units in s["removals"].items()}
    small = dict(windows=3, max_length=32, rounds=1, new_tokens=4, heal_minutes=0.02, training_windows=16)
    return {**s, **small, "removals": removals}


# ---------------------------------------------------------------------------------------------------- reporting


def _display(name: str, entry: dict) -> str:
    """The model's name, with llama.cpp's architecture when it is not the original's: ``sub-layers (...; `deci`)``."""
    if entry["architecture"] == "llama":
        return name
    return f"{name[:-1]}; `{entry['architecture']}`)" if name.endswith(")") else f"{name} (`{entry['architecture']}`)"


def docs_table(experiment: dict, results: list[tuple[dict, dict]], part: str | None = None) -> str:
    settings, result = results[0]
    models = result["models"]
    base = models["original"]["types"]
    lines = [
        "| model | file | MiB | ppl A bbc_news | ppl B wiki | prompt tok/s (x original) "
        "| generation tok/s (x original) | FLOPs ratio |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, entry in models.items():
        for t, cell in entry["types"].items():
            prompt = cell["prompt tok/s"] / base[t]["prompt tok/s"]
            generation = cell["generation tok/s"] / base[t]["generation tok/s"]
            lines.append(
                f"| {_display(name, entry)} | {t} | {cell['MiB']} | {cell['ppl']['A bbc_news']:.1f} | "
                f"{cell['ppl']['B wiki']:.1f} | {cell['prompt tok/s']:.0f} ({prompt:.2f}) | "
                f"{cell['generation tok/s']:.0f} ({generation:.2f}) | {entry['flops ratio']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def _drift(entry: dict) -> dict[str, float]:
    """The worst perplexity rise of each quantized type over the f16 file (over both corpora)."""
    f16 = entry["types"]["f16"]["ppl"]
    return {t: max(cell["ppl"][c] / f16[c] - 1 for c in f16) for t, cell in entry["types"].items() if t != "f16"}


def _speedups(result: dict) -> list[tuple[str, str, float, float]]:
    """(model, type, generation speed-up, its share of the FLOPs ratio) of every smaller model, f16 and q4_k_m."""
    models = result["models"]
    base = models["original"]["types"]
    rows = []
    for name, entry in models.items():
        for t in ("f16", "q4_k_m"):
            if name != "original" and t in entry["types"]:
                g = entry["types"][t]["generation tok/s"] / base[t]["generation tok/s"]
                rows.append((name, t, g, g / entry["flops ratio"]))
    return rows


def _against_quantization(result: dict) -> list[tuple[str, dict, str, str, dict, list[str]]]:
    """Each file of the healed model against the original's best file (perplexity) no larger / as fast:
    (healed type, its cell, "no larger" / "as fast", original type or "", its cell, corpora where healing wins)."""
    models = result["models"]
    healed = next((entry for name, entry in models.items() if name.endswith(" heal")), None)
    if healed is None:
        return []
    base = models["original"]["types"]
    rows = []
    for t, cell in healed["types"].items():
        size_peers = [(q, o) for q, o in base.items() if o["MiB"] <= cell["MiB"] * 1.02]
        speed_peers = [(q, o) for q, o in base.items() if o["generation tok/s"] >= cell["generation tok/s"] * 0.98]
        for label, peers in (("no larger", size_peers), ("as fast", speed_peers)):
            if not peers:
                rows.append((t, cell, label, "", {}, []))
                continue
            q, o = min(peers, key=lambda p: p[1]["ppl"]["A bbc_news"] + p[1]["ppl"]["B wiki"])
            rows.append((t, cell, label, q, o, [c for c in cell["ppl"] if cell["ppl"][c] < o["ppl"][c]]))
    return rows


def _command_line(result: dict) -> str:
    command = result.get("command")
    if command is None:
        return "`hf-collapse export HEALED_FOLDER --format gguf --quantize q4_k_m`: not measured by the runner yet"
    return f"`{command['argv']} --output DIR`: {command['seconds']} s (target 120 s; exit code {command['returncode']})"


def _short(value: float) -> str:
    return f"{value:.1e}".replace("e-0", "e-")


def headline(experiment: dict, results: list[tuple[dict, dict]]) -> str:
    result = results[0][1]
    models = result["models"]
    diffs = [entry["max |logit diff| f32"] for entry in models.values()]
    shares = [share for *_, share in _speedups(result)]
    drifts = {t: [_drift(entry)[t] for entry in models.values()] for t in ("q8_0", "q4_k_m")}
    text = (
        f"logits within {_short(min(diffs))} to {_short(max(diffs))}; generation {min(shares):.2f}x to "
        f"{max(shares):.2f}x the FLOPs ratio; q8_0 within {max(drifts['q8_0']):.1%} of f16, q4_k_m "
        f"{min(drifts['q4_k_m']):.1%} to {max(drifts['q4_k_m']):.1%}"
    )
    closest = [row for row in _against_quantization(result) if row[2] == "no larger" and row[3]]
    if closest:
        t, cell, _, q, o, wins = min(closest, key=lambda row: row[1]["MiB"] - row[4]["MiB"])
        who = (
            f"the healed model in {t} wins on {', '.join(wins)}"
            if wins
            else f"the original in {q} beats the healed model in {t}"
        )
        text += (
            f"; {who} ({o['ppl']['A bbc_news']:.1f} vs {cell['ppl']['A bbc_news']:.1f} on news, "
            f"{o['ppl']['B wiki']:.1f} vs {cell['ppl']['B wiki']:.1f} on Wikipedia)"
        )
    command = result.get("command")
    seconds = "not measured by the runner yet" if command is None else f"{command['seconds']:.0f} s"
    return text + f"; `hf-collapse export --quantize q4_k_m` {seconds}"


def report(experiment: dict, results: list[tuple[dict, dict]], out: Path) -> str:
    text = f"# {experiment['name']}\n\n{experiment.get('description', '')}\n\n"
    if not results:
        return text + "Not run yet.\n"
    result = results[0][1]
    text += "; ".join(f"{k}: {v}" for k, v in result["setup"].items()) + "\n\n" + docs_table(experiment, results)
    lines = ["", "Checks:"]
    for name, entry in result["models"].items():
        drift = ", ".join(f"{t} {d:+.1%}" for t, d in _drift(entry).items())
        lines.append(
            f"- {name} ({entry['architecture']}): f32 logits within {entry['max |logit diff| f32']:.2g} of PyTorch "
            f"(target 1e-3); perplexity vs f16: {drift} (targets: q8_0 1%, q4_k_m 5%); export "
            f"{entry['export seconds (f32 checked + quantizations)']} s"
        )
    for name, t, g, share in _speedups(result):
        lines.append(f"- {name}, {t}: generation speed-up {g:.2f}x, {share:.2f} of the FLOPs ratio (target 0.9)")
    lines.append(f"- {_command_line(result)}")
    rows = _against_quantization(result)
    if rows:
        lines += ["", "Removal + healing against quantization alone (perplexity on held-out text, lower is better):"]
    for t, cell, label, q, o, wins in rows:
        if not q:
            lines.append(f"- healed {t}: no original file is {label}")
            continue
        verdict = "removal + healing wins on " + ", ".join(wins) if wins else "quantization alone wins"
        lines.append(
            f"- healed {t} ({cell['MiB']} MiB, {cell['generation tok/s']:.0f} tok/s, ppl "
            f"{cell['ppl']['A bbc_news']:.1f} / {cell['ppl']['B wiki']:.1f}) vs original {q} {label} ({o['MiB']} MiB, "
            f"{o['generation tok/s']:.0f} tok/s, ppl {o['ppl']['A bbc_news']:.1f} / {o['ppl']['B wiki']:.1f}): "
            f"{verdict}"
        )
    return text + "\n".join(lines) + "\n"
