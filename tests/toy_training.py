"""A tiny BERT, a toy token-classification dataset and a collator, for tests that run the real Trainer."""

import torch
from datasets import Dataset
from transformers import BertConfig, BertForSequenceClassification


class PadOnlyCollator:
    """Pads input_ids/attention_mask with zeros (a tokenizer-free DataCollatorWithPadding)."""

    def __call__(self, features):
        length = max(len(f["input_ids"]) for f in features)
        batch = {
            "input_ids": torch.tensor([f["input_ids"] + [0] * (length - len(f["input_ids"])) for f in features]),
            "attention_mask": torch.tensor(
                [[1] * len(f["input_ids"]) + [0] * (length - len(f["input_ids"])) for f in features]
            ),
            "labels": torch.tensor([f["label"] for f in features]),
        }
        return batch


def tiny_bert(seed=0, dropout=0.0, hidden_act="gelu"):
    torch.manual_seed(seed)
    return BertForSequenceClassification(
        BertConfig(
            vocab_size=50,
            hidden_size=16,
            num_hidden_layers=3,
            num_attention_heads=2,
            intermediate_size=24,
            max_position_embeddings=32,
            num_labels=2,
            hidden_dropout_prob=dropout,
            attention_probs_dropout_prob=dropout,
            hidden_act=hidden_act,
        )
    )


def toy_dataset(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = {"input_ids": [], "label": []}
    for i in range(n):
        length = int(torch.randint(4, 9, (1,), generator=g))
        label = i % 2
        ids = torch.randint(2, 25, (length,), generator=g) + 25 * label  # the label is visible in the tokens
        rows["input_ids"].append(ids.tolist())
        rows["label"].append(label)
    return Dataset.from_dict(rows)


def accuracy(prediction):
    return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}


def penalized_loop(model, penalty, batches, weight=0.5, optimizer=None, lr=5e-3):
    """Train ``model`` on ``batches`` with task loss + ``weight`` x ``penalty()`` (an MSWPenalty) in a plain PyTorch
    loop (AdamW by default). Returns the per-step ``penalty.last_values()`` and the optimizer."""
    optimizer = optimizer or torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    history = []
    for batch in batches:
        with penalty.capture(inputs=batch):
            loss = model(**batch).loss
        loss = loss + weight * penalty()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        history.append(penalty.last_values())
    return history, optimizer


def finish_distributed() -> None:
    """End a torchrun test script cleanly: wait for every rank, then destroy the process group. A rank that exits
    while gloo's threads still run can abort at interpreter shutdown ("terminate called without an active
    exception", SIGABRT), failing the run after all its work succeeded."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
