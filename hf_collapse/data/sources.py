"""Where data comes from on the command line: an embedded name, a local file or folder, or a Hub id."""

from __future__ import annotations

import os
import re
from pathlib import Path

from .embedded_datasets import is_embedded_dataset
from .embedded_models import is_embedded

__all__ = ["DATA_FILE_SUFFIXES", "check_source"]


DATA_FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().upper() in ("1", "ON", "YES", "TRUE")


def check_source(kind: str, name: str, embedded: list[str], local_hint: str) -> None:
    """Refuse, before anything runs, a ``kind`` (``"model"`` / ``"dataset"``) that is neither embedded, nor a local
    path, nor a Hub id that can be fetched; the message names what was wrong and what is accepted.

    Raises:
        ValueError: for a name that is no local path and either no Hub id or a Hub id while ``HF_HUB_OFFLINE`` is set.

    Example::

        >>> from hf_collapse.data import check_source
        >>> check_source("model", "./no_such_model", ["minilm"], "a saved model folder")
        Traceback (most recent call last):
        ValueError: model './no_such_model': no such file or folder, and not a Hub id; expected an embedded model ...
    """
    path = Path(name)
    accepted = f"an embedded {kind} ({', '.join(embedded)}), {local_hint}, or a Hub {kind} id"
    if path.exists() or (kind == "model" and is_embedded(name)) or (kind == "dataset" and is_embedded_dataset(name)):
        return
    if not _HUB_ID.match(name) or name.startswith((".", "/", "~")) or "\\" in name:
        raise ValueError(f"{kind} {name!r}: no such file or folder, and not a Hub id; expected {accepted}")
    if _hub_offline():
        raise ValueError(
            f"{kind} {name!r} is not a local path, and the Hub is off (HF_HUB_OFFLINE=1) so it cannot be "
            f"fetched as a Hub id; expected {accepted}"
        )
