"""Text sources for evaluation and calibration.

A source is a local ``.txt`` file (read whole), a ``.jsonl`` file (one document per
line, the ``field`` key), ``asset:NAME``, or a named dataset loaded through
``datasets`` with the conventions of the GPTQ paper's evaluation code:

=========  ===============================================  ==========  ==============  =======
name       dataset (config)                                 eval split  calib split     joined
=========  ===============================================  ==========  ==============  =======
wikitext2  wikitext (wikitext-2-raw-v1), field ``text``     test        train           "\\n\\n"
ptb        ptb_text_only (penn_treebank), ``sentence``      test        train           " "
c4         allenai/c4, en/c4-{validation,train}.00000 shard first 1100  train           " "
                                                            documents
=========  ===============================================  ==========  ==============  =======

For local text, ``range`` selects a fraction of the characters: the demo evaluates on
``[0.6, 1.0]`` of its novel and calibrates on ``[0.0, 0.6]``, so the two never overlap.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import field_validator, model_validator

from . import assets
from .errors import UserError, read_utf8
from .schemes import StrictModel


@dataclass(frozen=True)
class NamedDataset:
    path: str
    name: str | None
    field: str
    join: str
    splits: dict[str, str]  # purpose ("eval" / "calib") -> split
    data_files: dict[str, str] | None = None
    eval_docs: int | None = None  # GPTQ's C4 evaluation uses the first 1100 validation documents


DATASETS = {
    "wikitext2": NamedDataset("wikitext", "wikitext-2-raw-v1", "text", "\n\n", {"eval": "test", "calib": "train"}),
    "ptb": NamedDataset("ptb_text_only", "penn_treebank", "sentence", " ", {"eval": "test", "calib": "train"}),
    "c4": NamedDataset(
        "allenai/c4", None, "text", " ", {"eval": "validation", "calib": "train"},
        data_files={"train": "en/c4-train.00000-of-01024.json.gz", "validation": "en/c4-validation.00000-of-00008.json.gz"},
        eval_docs=1100,
    ),
}


class TextSpec(StrictModel):
    # A .txt or .jsonl file, asset:NAME, or a dataset: wikitext2, c4, ptb.
    source: str
    # Fraction [start, end) of a local text's characters to use.
    range: tuple[float, float] = (0.0, 1.0)
    # The key holding each document in a .jsonl file.
    field: str = "text"
    # A local copy of a named dataset (same layout as its Hub repository), for offline use.
    dataset_path: str | None = None

    @field_validator("range")
    @classmethod
    def _range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0.0 <= v[0] < v[1] <= 1.0:
            raise ValueError(f"{list(v)} is not a range of fractions; write [start, end] with 0 <= start < end <= 1")
        return v

    @model_validator(mode="after")
    def _kind(self) -> "TextSpec":
        if self.is_dataset and self.range != (0.0, 1.0):
            raise ValueError(f"range applies to local text; {self.source} has fixed splits")
        if self.dataset_path and not self.is_dataset:
            raise ValueError(f"dataset_path goes with a named dataset ({', '.join(DATASETS)})")
        return self

    @property
    def is_dataset(self) -> bool:
        return self.source in DATASETS


@dataclass
class Text:
    text: str
    meta: dict[str, Any]  # what was read: source, range/split, characters, documents, sha256

    @property
    def fingerprint(self) -> str:
        return self.meta["sha256"]


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def load_text(spec: TextSpec, purpose: str = "eval") -> Text:
    """The text of a source, as one string, with a record of exactly what was taken."""
    if spec.is_dataset:
        text, meta = _load_dataset(spec, purpose)
    else:
        path = Path(assets.resolve(spec.source)).expanduser()
        if not path.is_file():
            allowed = ", ".join(DATASETS)
            raise UserError(f"text source {spec.source!r} is not a file, an asset or a dataset ({allowed})")
        if path.suffix == ".jsonl":
            docs = _read_jsonl(path, spec.field)
            full = "\n\n".join(docs)
        else:
            full = read_utf8(path, "text file")
        start, end = (int(len(full) * f) for f in spec.range)
        text = full[start:end]
        meta = {"source": spec.source, "path": str(path), "range": list(spec.range), "characters_total": len(full)}
    if not text.strip():
        raise UserError(f"text source {spec.source!r} gave no text")
    meta.update(characters=len(text), sha256=sha256_text(text))
    return Text(text, meta)


def _read_jsonl(path: Path, field: str) -> list[str]:
    docs = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{n}: not JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get(field), str):
                raise UserError(f"{path}:{n}: no string field {field!r} (set text.field)")
            docs.append(row[field])
    return docs


def _load_dataset(spec: TextSpec, purpose: str) -> tuple[str, dict[str, Any]]:
    import datasets

    d = DATASETS[spec.source]
    split = d.splits[purpose]
    path = spec.dataset_path or d.path
    kw: dict[str, Any] = {"split": split}
    if d.data_files:
        kw["data_files"] = {split: d.data_files[split]}
    with tempfile.TemporaryDirectory(prefix="llmquant-datasets-") as tmp:
        if spec.dataset_path:  # datasets' cache keys a local copy by its layout, not its contents: never reuse it
            kw["cache_dir"] = tmp
        try:
            ds = datasets.load_dataset(path, d.name, **kw)
        except Exception as e:  # network, missing files, wrong layout: one line for the user
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"could not load dataset {spec.source} ({path}, split {split}): {first}") from None
        docs = [str(x) for x in ds[d.field]]
    if purpose == "eval" and d.eval_docs:
        docs = docs[: d.eval_docs]
    text = d.join.join(docs)
    return text, {"source": spec.source, "dataset": path, "config": d.name, "split": split, "documents": len(docs), "joined_with": d.join}
