"""What the MiniLM speed benchmarks share: the real all-MiniLM-L6-v2, its blocks scored by block influence on real
dialog lines, and a batch of those lines padded to a fixed length."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader
from transformers import AutoModel, AutoTokenizer, DataCollatorWithPadding

import hf_collapse
from hf_collapse.data import embedded_model_path, load_dialog_topics, tokenize_text_dataset


def scored_minilm(batch: int, max_length: int) -> tuple[torch.nn.Module, dict[str, float], dict[str, torch.Tensor]]:
    """``(model, block scores, inputs)``: the pretrained MiniLM (eval mode), ShortGPT's block influence of each block
    on 4 batches of test dialog lines, and ``batch`` of those lines padded to ``max_length`` tokens."""
    folder = embedded_model_path("minilm")
    model, tokenizer = AutoModel.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    data = tokenize_text_dataset(load_dialog_topics(seed=0), tokenizer, max_length=max_length)["test"]
    data = data.remove_columns("label")
    loader = DataLoader(data, batch_size=32, collate_fn=DataCollatorWithPadding(tokenizer))
    scores = hf_collapse.score_blocks(model, loader, method="block_influence", max_batches=4, progress=False)
    lines = [data[i]["input_ids"] for i in range(batch)]
    inputs = tokenizer.pad({"input_ids": lines}, padding="max_length", max_length=max_length, return_tensors="pt")
    return model, scores, {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}
