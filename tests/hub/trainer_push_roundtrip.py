"""Train a tiny BERT with LaCoOTTrainer, collapse it, and publish it with ``trainer.push_to_hub()``.

Run by tests/test_lacoot_lifecycle.py in a subprocess with HF_ENDPOINT pointing at tests/local_hub.py (it must be set
before huggingface_hub is imported), or at the real Hub with HF_COLLAPSE_REAL_HUB=1 (see local_hub.HubTarget). The
pushed repository is pulled back with ``snapshot_download`` into a fresh cache and loaded with plain
``from_pretrained``. Prints one JSON line of findings.
"""

import json
import re
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from local_hub import HubTarget  # noqa: E402
from toy_training import PadOnlyCollator, accuracy, tiny_bert, toy_dataset  # noqa: E402
from transformers import BertForSequenceClassification  # noqa: E402

from hf_collapse import LaCoOTArguments, LaCoOTTrainer  # noqa: E402

output_dir = Path(sys.argv[1])
target = HubTarget()
repo_id = target.repo("lacoot-bert")
args = LaCoOTArguments(
    str(output_dir),
    per_device_train_batch_size=4,
    num_train_epochs=1,
    learning_rate=1e-2,
    report_to=[],
    save_strategy="no",
    use_cpu=True,
    disable_tqdm=True,
    msw_weight=0.5,
    hub_model_id=repo_id,
    hub_token=target.token,
    hub_private_repo=target.private,
)
trainer = LaCoOTTrainer(
    model=tiny_bert(),
    args=args,
    train_dataset=toy_dataset(),
    eval_dataset=toy_dataset(8, seed=1),
    data_collator=PadOnlyCollator(),
    compute_metrics=accuracy,
)
trainer.train()
trainer.save_model()  # the trained (uncollapsed) model first: the push must replace it, not sit beside it
collapsed, report = trainer.collapse(num_units=2, latency_repeats=1)
trainer.push_to_hub()

from huggingface_hub import snapshot_download  # noqa: E402

snapshot = Path(snapshot_download(repo_id, cache_dir=tempfile.mkdtemp(), token=target.token))
files = sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file())
pulled = BertForSequenceClassification.from_pretrained(snapshot).eval()
card = (snapshot / "README.md").read_text()
shown = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", card)
ids = torch.tensor([[5, 6, 7, 8, 9], [30, 31, 32, 0, 0]])
mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
with torch.no_grad():
    error = float(
        (
            pulled(input_ids=ids, attention_mask=mask).logits
            - collapsed.eval()(input_ids=ids, attention_mask=mask).logits
        )
        .abs()
        .max()
    )
print(
    json.dumps(
        {
            "files": files,
            "shown": shown,
            "layers": pulled.config.num_hidden_layers,
            "collapsed_layers": collapsed.config.num_hidden_layers,
            "trained_layers": trainer.model.config.num_hidden_layers,
            "removed_in_card": "2 blocks removed" in card,
            "removed": [r["name"] for r in report.removed],
            "names_in_card": all(r["name"] in card for r in report.removed),
            "error": error,
            "plain_loading_code": f'BertForSequenceClassification.from_pretrained("{repo_id}")' in card,
        }
    )
)
