"""llama.cpp, the runtime itself: its HF-to-GGUF converter, its quantizer and its forward pass (via llama-cpp-python).

* :func:`converter_dir`: llama.cpp's own converter (``convert_hf_to_gguf.py``, ``conversion/``, ``gguf-py/``) of the
  installed llama-cpp-python's version. The wheel does not ship it, its source distribution does: it is taken from
  there once (``pip download``, the package index only) and kept in the cache.
* :func:`convert`: a Hugging Face folder to a GGUF file, by that converter in a subprocess. The one adaptation: the
  DeciLM converter only knows Llama-3's 128,256-token vocabulary and SentencePiece ones; a DeciLM folder with another
  BPE tokenizer (SmolLM2's) takes the converter's generic BPE path, which every Llama-family BPE model takes.
* :func:`quantize`: llama.cpp's ``llama_model_quantize`` (what ``llama-quantize`` runs).
* :func:`logits_runner`: the GGUF file's logits for every position, computed by llama.cpp (f32 KV cache by default,
  so that an f32 file can be compared with PyTorch to 1e-4).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from .base import Runner

__all__ = [
    "GGUF_TYPES",
    "LLAMA_CPP_PACKAGE",
    "convert",
    "converter_dir",
    "copy_tokenizer",
    "llama_cpp_version",
    "logits_runner",
    "quantize",
    "require_llama_cpp",
]

LLAMA_CPP_PACKAGE = "llama-cpp-python"
#: llama.cpp's file types by the names its tools use (``llama-quantize``'s), and their ``LLAMA_FTYPE_*`` values.
GGUF_TYPES = {"f32": 0, "f16": 1, "q8_0": 7, "q4_0": 2, "q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}
#: Where the converter sits inside llama-cpp-python's source distribution.
_VENDORED = "vendor/llama.cpp/"
_CONVERTER_PARTS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")

# Run in a subprocess: llama.cpp's converter, with the generic BPE vocabulary for DeciLM folders whose tokenizer is
# neither Llama-3's nor SentencePiece (the converter's own DeciLM path refuses them; its Llama path takes this one).
_DRIVER = r"""
import json, sys
from pathlib import Path
converter, folder, outfile, outtype = sys.argv[1:5]
sys.path.insert(0, converter)
sys.path.insert(1, str(Path(converter) / "gguf-py"))
import convert_hf_to_gguf
from conversion import get_model_class
from conversion.base import ModelBase

Deci = get_model_class("DeciLMForCausalLM")


class DeciWithBPE(Deci):
    model_arch = Deci.model_arch

    def set_vocab(self):
        tokenizer = Path(self.dir_model) / "tokenizer.json"
        if self.hparams.get("vocab_size") != 128256 and tokenizer.is_file():
            model = json.loads(tokenizer.read_text()).get("model", {})
            if model.get("type") == "BPE" and not model.get("byte_fallback"):
                return self._set_vocab_gpt2()
        return super().set_vocab()


ModelBase.register("DeciLMForCausalLM")(DeciWithBPE)
sys.argv = ["convert_hf_to_gguf.py", folder, "--outfile", outfile, "--outtype", outtype]
convert_hf_to_gguf.main()
"""


def require_llama_cpp() -> None:
    """Refuse, saying how to install it, when llama-cpp-python is missing."""
    if importlib.util.find_spec("llama_cpp") is None:
        raise ValueError(
            "the gguf and decilm exports run llama.cpp through llama-cpp-python: pip install 'hf_collapse[export]' "
            "(it builds llama.cpp from source, minutes once per machine; docs/serving.md says which build flags to use)"
        )


def llama_cpp_version() -> str:
    return importlib.metadata.version(LLAMA_CPP_PACKAGE)


def _cache_root() -> Path:
    from ..data.embedded_models import cache_dir

    return cache_dir()


def converter_dir() -> Path:
    """The folder of llama.cpp's HF-to-GGUF converter, of the installed llama-cpp-python's version.

    ``$HF_COLLAPSE_LLAMA_CPP_CONVERTER`` names one; otherwise the converter is extracted once from the source
    distribution of the installed version (``pip download``; pip's cache serves it when the package was built
    here) into the cache (:func:`hf_collapse.data.cache_dir`).
    """
    configured = os.environ.get("HF_COLLAPSE_LLAMA_CPP_CONVERTER", "").strip()
    if configured:
        folder = Path(configured).expanduser()
        if not (folder / "convert_hf_to_gguf.py").is_file():
            raise ValueError(f"HF_COLLAPSE_LLAMA_CPP_CONVERTER={configured} holds no convert_hf_to_gguf.py")
        return folder
    require_llama_cpp()
    version = llama_cpp_version()
    folder = _cache_root() / f"llama.cpp-converter-{version}"
    if (folder / "convert_hf_to_gguf.py").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent) as scratch:
        done = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:"]
            + [f"{LLAMA_CPP_PACKAGE}=={version}", "--dest", scratch],
            capture_output=True,
            text=True,
        )
        archives = list(Path(scratch).glob("*.tar.gz"))
        if done.returncode != 0 or not archives:
            raise RuntimeError(
                f"could not fetch llama.cpp's converter (the source distribution of {LLAMA_CPP_PACKAGE}=={version}): "
                f"{done.stderr.strip()[-1000:]}; or set HF_COLLAPSE_LLAMA_CPP_CONVERTER to a llama.cpp checkout"
            )
        extracted = Path(scratch) / "converter"
        with tarfile.open(archives[0]) as archive:
            for member in archive.getmembers():
                _, _, inside = member.name.partition(_VENDORED)
                if inside and inside.startswith(_CONVERTER_PARTS) and (member.isfile() or member.isdir()):
                    member.name = inside
                    archive.extract(member, extracted, filter="data")
        if not (extracted / "convert_hf_to_gguf.py").is_file():
            raise RuntimeError(f"{archives[0].name} holds no {_VENDORED}convert_hf_to_gguf.py")
        try:
            extracted.rename(folder)
        except OSError:  # another process got there first
            if not (folder / "convert_hf_to_gguf.py").is_file():
                raise
    return folder


def convert(folder: Path, outfile: Path, outtype: str = "f32") -> Path:
    """Convert the Hugging Face folder ``folder`` (weights, config and tokenizer) to the GGUF file ``outfile`` with
    llama.cpp's own converter (``outtype``: ``"f32"``, ``"f16"``, ``"bf16"`` or ``"q8_0"``)."""
    done = subprocess.run(
        [sys.executable, "-c", _DRIVER, str(converter_dir()), str(folder), str(outfile), outtype],
        capture_output=True,
        text=True,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
    )
    if done.returncode != 0 or not outfile.is_file():
        raise ValueError(f"llama.cpp's converter refused {folder}:\n{(done.stderr or done.stdout).strip()[-3000:]}")
    return outfile


def quantize(source: Path, target: Path, type_name: str, threads: int = 0) -> Path:
    """Quantize the GGUF file ``source`` to ``type_name`` (a key of :data:`GGUF_TYPES`) with llama.cpp's quantizer."""
    if type_name not in GGUF_TYPES:
        raise ValueError(f"unknown GGUF type {type_name!r}; accepted: {', '.join(GGUF_TYPES)}")
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = GGUF_TYPES[type_name]
    params.nthread = int(threads)
    failed = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params)
    if failed or not target.is_file():
        raise ValueError(f"llama.cpp could not quantize {source.name} to {type_name} (code {failed})")
    return target


def logits_runner(path: Path, threads: int = 1, f32_cache: bool = True, context: int = 2048) -> Runner:
    """The GGUF model at ``path`` run by llama.cpp: ``{"input_ids": (batch, length)}`` in, ``[logits]`` (batch,
    length, vocabulary) out, one sequence at a time from an empty KV cache (f32 unless ``f32_cache`` is false:
    llama.cpp's default f16 cache alone moves logits by about 0.03)."""
    from llama_cpp import Llama

    f32 = 0  # GGML_TYPE_F32
    llm = Llama(
        model_path=str(path),
        n_ctx=context,
        n_batch=context,
        n_ubatch=context,
        n_threads=int(threads),
        n_threads_batch=int(threads),
        logits_all=True,
        verbose=False,
        **({"type_k": f32, "type_v": f32} if f32_cache else {}),
    )

    def run(inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        if mask is not None and not np.all(mask == 1):
            raise ValueError("the llama.cpp runner takes unpadded sequences (an attention mask of ones)")
        rows = []
        for row in ids:
            llm.reset()
            llm.eval([int(t) for t in row])
            rows.append(np.array(llm.scores[: len(row)], dtype=np.float32))
        return [np.stack(rows)]

    run.llm = llm  # type: ignore[attr-defined]  # kept alive with the runner (and reachable for generation timing)
    return run


def copy_tokenizer(source: Path, target: Path, names: tuple[str, ...]) -> None:
    """Copy the files ``names`` that exist in ``source`` into ``target``: the tokenizer the converter writes into the
    GGUF."""
    for name in names:
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)
