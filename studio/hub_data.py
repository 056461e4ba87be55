"""Data sets from the Hugging Face hub by id ('owner/name'), read with ``datasets.load_dataset`` (its 'train'
split) when online; offline, the same clear message the studio gives for models not downloaded.

Only on the owner's own studio: a shared studio accepts uploads and the demo sets only (service.check_data_allowed).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from studio.errors import StudioError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,95}$")
FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt", ".md")


def is_hub_id(path: str) -> bool:
    """'owner/name' that is not a file here and does not look like one."""
    return bool(HUB_ID.match(path)) and not Path(path).exists() and not path.lower().endswith(FILE_SUFFIXES)


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1"


def read(repo_id: str) -> list:
    """The 'train' split (or the first one) as (row number, record) pairs."""
    import datasets
    try:
        loaded = datasets.load_dataset(repo_id)
    except Exception as err:  # noqa: BLE001 - datasets raises many kinds; each gets the same advice
        if offline():
            raise StudioError(f"Data set {repo_id!r} is not downloaded and this studio is offline. On a machine with "
                              f"internet run: huggingface-cli download --repo-type dataset {repo_id}  (or upload the "
                              "data as a file).") from None
        raise StudioError(f"Could not get data set {repo_id!r} from the Hugging Face hub ({type(err).__name__}). Check "
                          "the id and your internet connection; for a gated data set, log in with huggingface-cli "
                          f"login. Offline, download it elsewhere with: huggingface-cli download --repo-type dataset "
                          f"{repo_id}") from None
    split = loaded["train"] if "train" in loaded else next(iter(loaded.values()))
    return list(enumerate(split.to_list(), start=1))
