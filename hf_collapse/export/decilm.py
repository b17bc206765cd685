"""The DeciLM (Nemotron-NAS) layout: a Llama whose layers differ, as vLLM, SGLang, mlx-lm and llama.cpp read it.

A Llama with removed sub-layers (``remove_blocks(..., granularity="attention" | "mlp")``) becomes a Hugging Face folder
with ``"architectures": ["DeciLMForCausalLM"]`` and one ``block_configs`` entry per layer, Llama weight names, and only
the weights a layer keeps:

* a layer without attention: ``attention: {no_op: true, n_heads_in_group: null}`` (vLLM, SGLang and mlx-lm read
  ``no_op``, llama.cpp's converter the null), and neither its attention weights nor the norm before it;
* a layer without MLP: llama.cpp gets ``ffn: {no_op: true, ffn_mult: null}`` wrong (it then also discards the
  layer's attention output: it agrees with the whole layer removed), so such a layer keeps a **zero FFN of the
  smallest width the layout expresses** (256): its output is exactly zero in every runtime, at 256 / intermediate
  of an FFN's cost. The report and the card say how many;
* llama.cpp reads the attention's head size from the first layer: when the first layer has no attention it reads
  none and refuses the file. The first layer therefore keeps a **zero attention** (its output projection is zero, so
  its output is exactly zero) when its attention was removed;
* a layer without either is dropped (the layers are renumbered);
* FFN widths are derived by the runtimes from ``ffn_mult`` (``2/3 * ffn_mult * hidden``, rounded up to a multiple of
  256): a width that is not a multiple of 256 cannot be expressed and is refused.

Families the layout cannot express (q/k norms as in Qwen3, Gemma's norms, biases, other activations) are refused
before any work, saying what can be exported instead.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from ..architectures.base import is_causal_lm, unwrap_model
from ..architectures.sublayers import causal_attention_name, is_removed_sublayer, mlp_name
from ..surgery.record import collapse_record
from .base import ExportFormat, Runner, Served
from .llama_cpp import convert, llama_cpp_version, logits_runner, require_llama_cpp

__all__ = ["DECILM_ARCHITECTURE", "DeciLM", "DeciLMLayout", "decilm_layout", "write_decilm"]

DECILM_ARCHITECTURE = "DeciLMForCausalLM"
#: The edits whose result is still a stack of Llama layers (a TLC-fused model holds linear maps no layout has).
LAYER_EDITS = ("remove_blocks", "remove_sublayers")
#: The width granularity of DeciLM's FFNs.
WIDTH_MULTIPLE = 256
FILE = "model.safetensors"

# Saved beside config.json: the config class the runtimes load with trust_remote_code (block_configs as objects with
# attributes, as NVIDIA's own configuration_decilm.py gives them).
CONFIGURATION_FILE = "configuration_decilm.py"
CONFIGURATION_SOURCE = '''"""DeciLM (Nemotron-NAS) config written by hf_collapse: block_configs as objects."""

from types import SimpleNamespace

from transformers import PretrainedConfig


def _namespace(value):
    if isinstance(value, dict):
        return SimpleNamespace(**{k: _namespace(v) for k, v in value.items()})
    return value


def _plain(value):
    if isinstance(value, SimpleNamespace):
        return {k: _plain(v) for k, v in vars(value).items()}
    return value


class DeciLMConfig(PretrainedConfig):
    model_type = "nemotron-nas"

    def __init__(self, block_configs=None, **kwargs):
        self.block_configs = [_namespace(b) for b in block_configs or []]
        super().__init__(**kwargs)

    def to_dict(self):
        output = super().to_dict()
        output["block_configs"] = [_plain(b) for b in self.block_configs]
        return output
'''


def _attention_config(kept: bool, n_heads_in_group: int | None) -> dict[str, Any]:
    return {
        "no_op": not kept,
        "replace_with_linear": False,
        "sparsify": None,
        "n_heads_in_group": n_heads_in_group if kept else None,
        "window_length": None,
        "num_sink_tokens": None,
        "use_prefill_window_in_sink_attention": False,
        "unshifted_sink": False,
    }


def _ffn_config(ffn_mult: float) -> dict[str, Any]:
    return {"no_op": False, "replace_with_linear": False, "sparsify": None, "ffn_mult": ffn_mult}


def ffn_mult_for(width: int, hidden_size: int) -> float:
    """The ``ffn_mult`` from which the runtimes derive an FFN of ``width`` (refused when none does)."""
    mult = round(3 * width / (2 * hidden_size), 6)
    derived = int(2 * mult * hidden_size / 3)
    derived = derived if derived % WIDTH_MULTIPLE == 0 else derived + WIDTH_MULTIPLE - derived % WIDTH_MULTIPLE
    if derived != width:
        raise ValueError(
            f"an FFN of width {width} cannot be expressed in the DeciLM layout: the runtimes derive widths as "
            f"2/3 * ffn_mult * hidden_size rounded up to a multiple of {WIDTH_MULTIPLE}"
        )
    return mult


def _layers(model: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
    backbone = getattr(unwrap_model(model), "model", None)
    layers = getattr(backbone, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(model).__name__} has no model.layers: not a Llama-family decoder")
    return backbone, layers


def check_decilm(model: nn.Module) -> None:
    """Refuse, saying why and what can be exported instead, a model the DeciLM layout cannot express."""
    if not is_causal_lm(model):
        raise ValueError(f"{type(model).__name__} is not a causal LM: the DeciLM layout holds decoders")
    config = unwrap_model(model).config
    instead = (
        "export a whole-block removal instead (granularity='block': a plain checkpoint of the family's own "
        "architecture that llama.cpp and vLLM load as it is), or keep the folder for AutoCollapsedModel"
    )
    reasons = []
    if config.model_type != "llama":
        reasons.append(f"its family is {config.model_type!r} (the layout holds Llama layers only)")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        reasons.append("its projections have biases")
    if getattr(config, "hidden_act", "silu") != "silu":
        reasons.append(f"its activation is {config.hidden_act!r}, not silu")
    heads = config.num_attention_heads
    if getattr(config, "head_dim", None) not in (None, config.hidden_size // heads):
        reasons.append("its head_dim is not hidden_size / num_attention_heads")
    if heads % getattr(config, "num_key_value_heads", heads):
        reasons.append("its heads are not a multiple of its key/value heads")
    record = collapse_record(model) or {}
    others = sorted({e.get("op") for e in record.get("edits", []) if e.get("op") not in LAYER_EDITS})
    if others:
        reasons.append(f"it was edited by {', '.join(others)} (fused linear maps are no Llama layer)")
    if reasons:
        raise ValueError(
            f"{type(model).__name__} cannot be written in the DeciLM layout: {'; '.join(reasons)}. {instead}"
        )
    _, layers = _layers(model)
    for layer in layers:
        name = mlp_name(layer)
        mlp = getattr(layer, name) if name else None
        if mlp is not None and not is_removed_sublayer(mlp):
            ffn_mult_for(mlp.down_proj.in_features, config.hidden_size)


class DeciLMLayout:
    """The layout of one model: its ``config`` (``block_configs`` included), its ``state_dict`` (Llama names, only
    what the layers keep), ``zero_ffn_layers`` (layers without MLP that carry a zero FFN), ``zero_attention_layers``
    (the first layer, when it lost its attention: it carries a zero one) and ``dropped_layers`` (layers without either
    sub-layer, left out). Layers are numbered as in the model."""

    def __init__(self, config, state_dict, zero_ffn_layers=(), zero_attention_layers=(), dropped_layers=()):
        self.config: dict[str, Any] = config
        self.state_dict: dict[str, torch.Tensor] = state_dict
        self.zero_ffn_layers: list[int] = list(zero_ffn_layers)
        self.zero_attention_layers: list[int] = list(zero_attention_layers)
        self.dropped_layers: list[int] = list(dropped_layers)


def decilm_layout(model: nn.Module) -> DeciLMLayout:
    """The DeciLM layout of a Llama whose layers may have lost their attention or their MLP."""
    check_decilm(model)
    model = unwrap_model(model)
    config = model.config
    backbone, layers = _layers(model)
    heads, hidden = config.num_attention_heads, config.hidden_size
    n_heads_in_group = heads // getattr(config, "num_key_value_heads", heads)
    state: dict[str, torch.Tensor] = {"model.embed_tokens.weight": backbone.embed_tokens.weight}
    blocks, zero_ffn, zero_attention, dropped = [], [], [], []
    weight = backbone.embed_tokens.weight
    for index, layer in enumerate(layers):
        attention = getattr(layer, causal_attention_name(layer) or "self_attn")
        mlp = getattr(layer, mlp_name(layer) or "mlp")
        keeps_attention, keeps_mlp = not is_removed_sublayer(attention), not is_removed_sublayer(mlp)
        if not keeps_attention and not keeps_mlp:
            dropped.append(index)
            continue
        prefix = f"model.layers.{len(blocks)}."
        if keeps_attention:
            state[prefix + "input_layernorm.weight"] = layer.input_layernorm.weight
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                state[f"{prefix}self_attn.{proj}.weight"] = getattr(attention, proj).weight
        elif not blocks:  # llama.cpp takes the head size from the first layer: it must have attention
            zero_attention.append(index)
            head_dim, kv_heads = hidden // heads, heads // n_heads_in_group
            state[prefix + "input_layernorm.weight"] = torch.ones(hidden, dtype=weight.dtype)
            state[f"{prefix}self_attn.q_proj.weight"] = weight.new_zeros(heads * head_dim, hidden)
            state[f"{prefix}self_attn.k_proj.weight"] = weight.new_zeros(kv_heads * head_dim, hidden)
            state[f"{prefix}self_attn.v_proj.weight"] = weight.new_zeros(kv_heads * head_dim, hidden)
            state[f"{prefix}self_attn.o_proj.weight"] = weight.new_zeros(hidden, heads * head_dim)
        if keeps_mlp:
            width = mlp.down_proj.in_features
            state[prefix + "post_attention_layernorm.weight"] = layer.post_attention_layernorm.weight
            for proj in ("gate_proj", "up_proj", "down_proj"):
                state[f"{prefix}mlp.{proj}.weight"] = getattr(mlp, proj).weight
        else:  # llama.cpp drops the attention of an FFN-less layer: a zero FFN keeps the layer exact everywhere
            width = WIDTH_MULTIPLE
            zero_ffn.append(index)
            state[prefix + "post_attention_layernorm.weight"] = torch.ones(hidden, dtype=weight.dtype)
            state[prefix + "mlp.gate_proj.weight"] = weight.new_zeros(width, hidden)
            state[prefix + "mlp.up_proj.weight"] = weight.new_zeros(width, hidden)
            state[prefix + "mlp.down_proj.weight"] = weight.new_zeros(hidden, width)
        blocks.append(
            {
                "attention": _attention_config(keeps_attention or index in zero_attention, n_heads_in_group),
                "ffn": _ffn_config(ffn_mult_for(width, hidden)),
            }
        )
    state["model.norm.weight"] = backbone.norm.weight
    tied = bool(getattr(config, "tie_word_embeddings", False))
    if not tied:
        state["lm_head.weight"] = model.lm_head.weight
    rope = dict(getattr(config, "rope_parameters", None) or {"rope_theta": getattr(config, "rope_theta", 10000.0)})
    rope.setdefault("rope_type", "default")
    layout_config = {
        "architectures": [DECILM_ARCHITECTURE],
        "model_type": "nemotron-nas",
        "auto_map": {"AutoConfig": f"{CONFIGURATION_FILE[:-3]}.DeciLMConfig"},
        "vocab_size": config.vocab_size,
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "num_key_value_heads": getattr(config, "num_key_value_heads", heads),
        "num_hidden_layers": len(blocks),
        "intermediate_size": None,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": rope.get("rope_theta", 10000.0),
        "rope_scaling": None if rope.get("rope_type") == "default" else rope,
        "rope_parameters": rope,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": tied,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "torch_dtype": str(backbone.embed_tokens.weight.dtype).removeprefix("torch."),
        "block_configs": blocks,
    }
    return DeciLMLayout(layout_config, state, zero_ffn, zero_attention, dropped)


def write_decilm(model: nn.Module, folder: Path) -> tuple[list[Path], DeciLMLayout]:
    """Write ``model`` into ``folder`` in the DeciLM layout (weights, ``config.json``, the config class); the
    tokenizer files are the caller's. Returns the files written and the layout."""
    layout = decilm_layout(model)
    folder.mkdir(parents=True, exist_ok=True)
    weights, config, module = folder / FILE, folder / "config.json", folder / CONFIGURATION_FILE
    save_file({k: v.detach().contiguous().cpu() for k, v in layout.state_dict.items()}, str(weights), {"format": "pt"})
    config.write_text(json.dumps(layout.config, indent=2) + "\n")
    module.write_text(CONFIGURATION_SOURCE)
    return [weights, config, module], layout


def layout_notes(layout: DeciLMLayout, intermediate: int | None) -> list[str]:
    notes = []
    if layout.zero_ffn_layers:
        cost = f" ({WIDTH_MULTIPLE / intermediate:.2f} of an FFN's cost each)" if intermediate else ""
        notes.append(
            f"Layers {layout.zero_ffn_layers} lost their MLP: each carries a zero FFN of width {WIDTH_MULTIPLE}"
            f"{cost}, because llama.cpp discards the attention of a layer whose FFN is null; its output is exactly 0."
        )
    if layout.zero_attention_layers:
        notes.append(
            f"Layer {layout.zero_attention_layers[0]} lost its attention but is the first layer: it carries a zero "
            "attention (output exactly 0), because llama.cpp reads the head size from the first layer."
        )
    if layout.dropped_layers:
        notes.append(f"Layers {layout.dropped_layers} lost both sub-layers and are left out of the layout.")
    return notes


class DeciLM(ExportFormat):
    """A Hugging Face folder in the DeciLM layout, checked by converting it with llama.cpp's own DeciLM converter and
    running the result in llama.cpp (vLLM, SGLang and mlx-lm read the same folder)."""

    name = "decilm"
    description = "a Hugging Face folder in NVIDIA's DeciLM layout (per-layer block_configs) for vLLM / SGLang / mlx-lm"
    runtime = "llama.cpp (DeciLM converter)"
    requirements = ("llama_cpp", "gguf")
    families = ("decoder",)
    needs_tokenizer = True

    def with_options(self, **options: Any) -> DeciLM:
        super().with_options(**options)
        return DeciLM()  # one per export: it keeps the layout between write and finish

    def check(self, model: nn.Module) -> None:
        require_llama_cpp()
        check_decilm(model)

    def write(self, model: nn.Module, output: Path, inputs: Mapping[str, Any]) -> list[Path]:
        files, self._layout = write_decilm(model, output)
        self._intermediate = getattr(unwrap_model(model).config, "intermediate_size", None)
        return files

    def runner(self, output: Path, threads: int = 1) -> Runner:
        import tempfile

        scratch = tempfile.TemporaryDirectory()
        run = logits_runner(convert(output, Path(scratch.name) / "check-f32.gguf"), threads=threads)
        run.scratch = scratch  # type: ignore[attr-defined]  # removed with the runner
        self._checked = (output, threads, run)
        return run

    def finish(self, output, files, feed, expected, threads) -> Served:
        checked = getattr(self, "_checked", None)
        run = checked[2] if checked and checked[:2] == (output, threads) else self.runner(output, threads)
        return Served(run, files, layout_notes(self._layout, self._intermediate))

    def runtime_version(self) -> str:
        return f"llama.cpp (llama-cpp-python {llama_cpp_version()}), converted by its DeciLM converter"

    def how_to_run(self, output: Path, input_names: list[str]) -> str:
        return "\n".join(
            [
                "vLLM (its `nemotron_nas` model reads `block_configs`):",
                "",
                "```python",
                "from vllm import LLM",
                "",
                'llm = LLM(model="path/to/this/folder", trust_remote_code=True)  # the config class ships here',
                'print(llm.generate("The news today:")[0].outputs[0].text)',
                "```",
                "",
                'mlx-lm: `mlx_lm.generate --model path/to/this/folder --prompt "The news today:"`.',
                "",
                "llama.cpp: `python convert_hf_to_gguf.py path/to/this/folder --outtype f16` gives a GGUF of "
                "architecture `deci` (or `hf-collapse export MODEL --format gguf`, which does it and checks it).",
            ]
        )
