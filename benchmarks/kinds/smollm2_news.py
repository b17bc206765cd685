"""What the SmolLM2 fine-tuning kinds share: the real SmolLM2-135M in float32, BBC News windows in order, batches of
them and the held-out loss."""

from __future__ import annotations

import functools
import math

import torch

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def smollm2(blocks: int | None = None):
    """The embedded SmolLM2-135M-Instruct as a causal LM in float32, without the generation cache, in train mode;
    only its first ``blocks`` decoder blocks when given (a small model for smoke runs)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from hf_collapse.data import embedded_model_path

    hf_logging.set_verbosity_error()
    model = AutoModelForCausalLM.from_pretrained(embedded_model_path("smollm2"), dtype=torch.float32)
    model.config.use_cache = False
    if blocks:
        model.model.layers = model.model.layers[:blocks]
        model.config.num_hidden_layers = blocks
        if getattr(model.config, "layer_types", None):
            model.config.layer_types = model.config.layer_types[:blocks]
    return model.train()


@functools.lru_cache(maxsize=2)
def news_windows(seq_len: int, train_windows: int, eval_windows: int):
    """``(train, validation, test)``: the first ``train_windows`` windows of ``seq_len`` tokens of BBC News's training
    split and the first ``eval_windows`` of its validation and test splits (de-duplicated), each a list of tensors."""
    from transformers import AutoTokenizer

    from hf_collapse.data import embedded_model_path, lm_windows, load_bbc_news

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_path("smollm2"))
    news = load_bbc_news()

    def cut(split, count):
        windows = lm_windows(news[split]["text"], tokenizer, max_length=seq_len, max_windows=count)
        return [{k: torch.as_tensor(v) for k, v in windows[i].items()} for i in range(len(windows))]

    return cut("train", train_windows), cut("validation", eval_windows), cut("test", eval_windows)


def stack(rows: list[dict]) -> dict:
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def batches(rows: list[dict], batch_size: int) -> list[dict]:
    """``rows`` in order, ``batch_size`` at a time (what every method trains on)."""
    return [stack(rows[i : i + batch_size]) for i in range(0, len(rows), batch_size)]


def held_out_loss(model, rows: list[dict]) -> float:
    """Token-weighted mean cross-entropy of ``model`` on ``rows`` (batches of 4; the log of their perplexity)."""
    from hf_collapse.metrics import perplexity

    return math.log(perplexity(model, batches(rows, 4)))
