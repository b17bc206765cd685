"""The progress folder of a collapse search: written after every step, read by ``resume_from``.

Every search of :mod:`hf_collapse.engine` (block removal, TLC, LaCoOT's collapse, ``hf-collapse prune``) can write its
progress to a folder and continue from it. Layout (``format: "hf_collapse.progress"``, ``version: 2``)::

    <progress_dir>/
      progress.json                 the commit point: written last, by atomic rename
      report.json                   the report so far (``CollapseReport.load(progress_dir)``); the final report
                                    once the run has finished
      weights-step<k>.safetensors   the model's weights after step k (while the run is unfinished, and only for a
                                    search whose steps change weights: fine-tuning, TLC's fused maps; a removal
                                    replays its recorded edits on the original weights)

``progress.json`` holds::

    {"format": "hf_collapse.progress", "version": 2,
     "status": "running" | "finished",
     "step": k,                     # the last finished step (0: only the original model was measured)
     "fingerprint": {...},          # what the run depends on: model class, config and weights digests, the
                                    # search's settings, the budget, the world size and, when known, the
                                    # TrainingArguments that shape fine-tuning and a digest of the data
     "search": {...},               # what the search needs to go on (e.g. the units not yet tried)
     "edits": [...],                # the edits this run made, in order (``hf_collapse`` record format)
     "record": {...} | null,        # the collapsed model's whole ``hf_collapse`` record, to check the replay
     "weights": "weights-step<k>.safetensors" | null,
     "rng": {...},                  # python / numpy / torch (and CUDA) generator states after step k
     "report": {...}}               # CollapseReport.to_dict() after step k

Every file is written under a temporary name and renamed into place, ``progress.json`` last, so an interrupted
write leaves the previous step's progress intact. A folder written by the TLC loop of hf_collapse 0.1
(``hf_collapse.tlc.progress``, version 1) is refused with that reason: start such a run over.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = [
    "FORMAT",
    "VERSION",
    "ProgressFolder",
    "batches_digest",
    "compare_fingerprints",
    "json_safe",
    "model_fingerprint",
    "refuse_everywhere",
    "rng_state",
    "set_rng_state",
    "training_fingerprint",
]

FORMAT = "hf_collapse.progress"
VERSION = 2
#: The format of the TLC loop's folders in hf_collapse 0.1.
_TLC_FORMAT = "hf_collapse.tlc.progress"

#: TrainingArguments fields that change what a fine-tuning between steps does.
TRAINING_FIELDS = (
    "seed",
    "data_seed",
    "full_determinism",
    "learning_rate",
    "weight_decay",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "max_grad_norm",
    "optim",
    "lr_scheduler_type",
    "warmup_steps",
    "warmup_ratio",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "num_train_epochs",
    "max_steps",
)

_VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "_commit_hash", "_diffusers_version"}


def _digest(parts: Iterable[bytes]) -> str:
    sha = hashlib.sha256()
    for part in parts:
        sha.update(part)
    return sha.hexdigest()


def json_safe(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists, unknown objects strings)."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _config_dict(model: nn.Module) -> dict[str, Any]:
    config = model.config
    data = dict(config) if isinstance(config, dict) else config.to_dict()
    return {k: v for k, v in data.items() if k not in _VOLATILE_CONFIG_KEYS}


def _weights_digest(model: nn.Module, samples: int = 4096) -> str:
    """A digest of every tensor's name, shape, dtype and an evenly strided sample of its values: different
    weights almost surely differ in the sample, and a multi-GB model is read in well under a second."""

    def parts():
        for name, tensor in sorted(model.state_dict().items()):
            flat = tensor.detach().reshape(-1)
            step = max(1, flat.numel() // samples)
            sample = flat[::step][:samples].to("cpu", torch.float64) if flat.numel() else flat.cpu().double()
            yield f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode()
            yield sample.numpy().tobytes()

    return _digest(parts())


def model_fingerprint(model: nn.Module, model_class: str) -> dict[str, str]:
    """The class, config and weights of the model a run starts from."""
    config = json.dumps(_config_dict(model), sort_keys=True, default=str).encode()
    return {"model_class": model_class, "model_config": _digest([config]), "model_weights": _weights_digest(model)}


def batches_digest(batches: Iterable[Mapping[str, Any]]) -> str:
    """A digest of the calibration batches (keys, shapes, values)."""

    def parts():
        for batch in batches:
            for key in sorted(batch):
                value = batch[key]
                yield key.encode()
                if isinstance(value, torch.Tensor):
                    tensor = value.detach().cpu()
                    yield f"{tuple(tensor.shape)}|{tensor.dtype}".encode()
                    yield (tensor.double() if tensor.is_floating_point() else tensor.long()).numpy().tobytes()
                else:
                    yield json.dumps(value, default=str).encode()

    return _digest(parts())


def training_fingerprint(args) -> dict[str, Any]:
    """The fields of ``TrainingArguments`` that shape the fine-tuning between steps (:data:`TRAINING_FIELDS`)."""
    return json_safe({name: getattr(args, name, None) for name in TRAINING_FIELDS})


# -- random generator states -----------------------------------------------------------------------------
def _b64(tensor: torch.Tensor) -> str:
    return base64.b64encode(tensor.cpu().numpy().tobytes()).decode()


def _unb64(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()


def rng_state() -> dict[str, Any]:
    """Every global generator the library, the Trainer and the user's code may draw from, as JSON."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": _b64(torch.get_rng_state()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore the generators saved by :func:`rng_state` (CUDA ones when the device count matches)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_unb64(state["torch"]))
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["cuda"]])


# -- the folder ------------------------------------------------------------------------------------------
def _write_atomic(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temporary.write_text(text)
    os.replace(temporary, path)


class ProgressFolder:
    """Reads and writes one search's progress folder (see the module docstring for the format)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    @property
    def state_file(self) -> Path:
        return self.path / "progress.json"

    def exists(self) -> bool:
        return self.state_file.is_file()

    def read(self) -> dict[str, Any]:
        """The saved state; ``ValueError`` when the folder holds none or something else."""
        if not self.exists():
            raise ValueError(
                f"{self.path} holds no collapse progress (no progress.json): pass the progress folder of "
                "an interrupted run as resume_from"
            )
        try:
            state = json.loads(self.state_file.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{self.state_file} is not valid JSON ({error}): not collapse progress") from error
        if isinstance(state, dict) and state.get("format") == _TLC_FORMAT:
            raise ValueError(
                f"{self.state_file} was written by the TLC loop of hf_collapse 0.1, whose progress this "
                "version cannot continue: start the run over"
            )
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise ValueError(f"{self.state_file} is not collapse progress (format {FORMAT!r} expected)")
        if state.get("version") != VERSION:
            raise ValueError(
                f"{self.state_file} has progress format version {state.get('version')!r}; this version "
                f"of hf_collapse reads version {VERSION}"
            )
        return state

    def write(self, state: dict[str, Any], model: nn.Module | None, report_json: str) -> None:
        """Commit one step: the weights (when ``model`` is given), the report, then ``progress.json``; older
        weight files are removed once the new state is in place."""
        from safetensors.torch import save_model

        self.path.mkdir(parents=True, exist_ok=True)
        state = dict(state, format=FORMAT, version=VERSION, weights=None)
        if model is not None:
            name = f"weights-step{state['step']}.safetensors"
            temporary = self.path / f".{name}.tmp-{os.getpid()}"
            save_model(model, str(temporary))
            os.replace(temporary, self.path / name)
            state["weights"] = name
        _write_atomic(self.path / "report.json", report_json + "\n")
        _write_atomic(self.state_file, json.dumps(state, indent=1))
        for stale in self.path.glob("weights-step*.safetensors"):
            if stale.name != state["weights"]:
                stale.unlink()

    def load_weights(self, model: nn.Module, state: Mapping[str, Any]) -> None:
        """Fill ``model`` (already rebuilt to the saved structure) with the saved weights."""
        from safetensors.torch import load_model

        if state.get("weights") is None:
            return
        file = self.path / state["weights"]
        if not file.is_file():
            raise ValueError(f"the progress in {self.path} names {state['weights']}, which is missing")
        device = next(model.parameters()).device
        missing, unexpected = load_model(model, file, strict=False, device=str(device))
        if missing or unexpected:
            raise ValueError(
                f"the weights in {file} do not match the replayed structure: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}"
            )


# -- resuming --------------------------------------------------------------------------------------------------
_FINGERPRINT_LABELS = {
    "model_class": "the model class",
    "model_config": "the model's config",
    "model_weights": "the model's weights",
    "search": "the search's settings",
    "budget": "the budget",
    "training": "the TrainingArguments",
    "world_size": "the number of processes",
    "data": "the calibration batches (train_dataset, collator or batch size)",
}


def compare_fingerprints(saved: Mapping[str, Any], current: Mapping[str, Any], main_process: bool = True) -> list[str]:
    """What differs between the fingerprint a run saved and the one of the run that wants to resume it, in words.
    Off the main process the data digest is not compared (each rank draws its own batches; the main process's is the
    saved one)."""
    problems = []
    for key, label in _FINGERPRINT_LABELS.items():
        if key == "data" and not main_process:
            continue
        if saved.get(key) != current.get(key):
            if isinstance(current.get(key), dict) and isinstance(saved.get(key), dict):
                fields = sorted(
                    k for k in set(saved[key]) | set(current[key]) if saved[key].get(k) != current[key].get(k)
                )
                problems.append(
                    f"{label} differ ("
                    + ", ".join(f"{k}: {saved[key].get(k)!r} then, {current[key].get(k)!r} now" for k in fields)
                    + ")"
                )
            elif key == "model_class":
                problems.append(f"it was written for a {saved.get(key)}, not a {current.get(key)}")
            else:
                problems.append(f"{label} differ from the interrupted run's")
    return problems


def refuse_everywhere(problems: list[str], folder: Path, what: str) -> None:
    """Raise on every rank when any rank found a problem (a lone raising rank would leave the others waiting)."""
    from ..distributed import sum_across_ranks

    failed = float(sum_across_ranks(torch.tensor([1.0 if problems else 0.0], dtype=torch.float64))[0])
    if failed:
        detail = "; ".join(problems) if problems else "another process refused it"
        raise ValueError(
            f"cannot resume {what} from {folder}: {detail}. Resume with the model, data, settings and "
            "TrainingArguments of the interrupted run, or start over without resume_from"
        )
