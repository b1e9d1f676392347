"""Text sources: local files with ranges, JSONL, and named datasets through local copies of their Hub layout."""

import gzip
import json

import pytest

from llmquant.data import TextSpec, load_text
from llmquant.errors import UserError


def test_local_text_ranges_do_not_overlap(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("abcdefghij" * 10)
    calib = load_text(TextSpec(source=str(f), range=(0.0, 0.6)))
    held = load_text(TextSpec(source=str(f), range=(0.6, 1.0)))
    assert calib.text + held.text == f.read_text()
    assert (calib.meta["characters"], held.meta["characters"]) == (60, 40)
    assert calib.fingerprint != held.fingerprint and len(held.fingerprint) == 64


def test_botchan_asset_split_is_the_documented_one(botchan_text):
    held = load_text(TextSpec(source="asset:botchan", range=(0.6, 1.0)))
    assert held.text == botchan_text[int(len(botchan_text) * 0.6) :]
    assert held.meta["characters_total"] == len(botchan_text)


def test_jsonl(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"body": "one"}\n\n{"body": "two"}\n')
    assert load_text(TextSpec(source=str(f), field="body")).text == "one\n\ntwo"
    with pytest.raises(UserError, match=r"d.jsonl:1: no string field 'text' \(set text.field\)"):
        load_text(TextSpec(source=str(f)))
    f.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(UserError, match="d.jsonl:2: not JSON"):
        load_text(TextSpec(source=str(f)))


def test_bad_sources(tmp_path):
    with pytest.raises(UserError, match="is not a file, an asset or a dataset"):
        load_text(TextSpec(source=str(tmp_path / "missing.txt")))
    with pytest.raises(ValueError, match="range applies to local text"):
        TextSpec(source="wikitext2", range=(0.5, 1.0))
    with pytest.raises(ValueError, match="not a range of fractions"):
        TextSpec(source="x.txt", range=(0.7, 0.2))
    (tmp_path / "empty.txt").write_text("   \n")
    with pytest.raises(UserError, match="gave no text"):
        load_text(TextSpec(source=str(tmp_path / "empty.txt")))


def _wikitext_copy(root):
    """A local copy laid out like the Hub repository (README configs + parquet files)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (root / "wikitext-2-raw-v1").mkdir(parents=True)
    pq.write_table(pa.table({"text": ["", " = Title = \n", " Some text here .\n"]}), root / "wikitext-2-raw-v1" / "test-00000-of-00001.parquet")
    pq.write_table(pa.table({"text": ["train one", "train two"]}), root / "wikitext-2-raw-v1" / "train-00000-of-00001.parquet")
    (root / "README.md").write_text(
        "---\nconfigs:\n- config_name: wikitext-2-raw-v1\n  data_files:\n"
        "  - split: test\n    path: wikitext-2-raw-v1/test-*\n  - split: train\n    path: wikitext-2-raw-v1/train-*\n---\n"
    )
    return root


def test_wikitext2_through_datasets(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    root = _wikitext_copy(tmp_path / "wikitext")
    t = load_text(TextSpec(source="wikitext2", dataset_path=str(root)), "eval")
    assert t.text == "\n\n = Title = \n\n\n Some text here .\n"  # test split joined with "\n\n", as GPTQ does
    assert (t.meta["split"], t.meta["documents"], t.meta["config"]) == ("test", 3, "wikitext-2-raw-v1")
    assert load_text(TextSpec(source="wikitext2", dataset_path=str(root)), "calib").text == "train one\n\ntrain two"


def test_c4_first_1100_validation_documents(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    (tmp_path / "c4" / "en").mkdir(parents=True)
    with gzip.open(tmp_path / "c4" / "en" / "c4-validation.00000-of-00008.json.gz", "wt") as f:
        for i in range(1200):
            f.write(json.dumps({"text": f"d{i}", "timestamp": "t", "url": "u"}) + "\n")
    t = load_text(TextSpec(source="c4", dataset_path=str(tmp_path / "c4")), "eval")
    assert t.meta["documents"] == 1100 and t.text.startswith("d0 d1 ") and t.text.endswith(" d1099")


def test_unreachable_dataset_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(UserError) as e:
        load_text(TextSpec(source="ptb", dataset_path=str(tmp_path / "nowhere")))
    assert str(e.value).startswith("could not load dataset ptb (") and "\n" not in str(e.value)
