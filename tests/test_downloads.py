"""lm/data/downloads.py: corpora lm fetches itself (Multi30k), checked before they are kept."""

import dataclasses
import gzip
import os

import pytest

from conftest import REPO, tiny_config
from lm.data import downloads, prepare
from lm.errors import UserError

MULTI30K = os.path.join(REPO, "..", "shared", "data", "multi30k")
PAIRS = {"train": [("a dog runs", "ein hund rennt"), ("two cats", "zwei katzen"),
                   ("a red car", "ein rotes auto")],
         "val": [("a man", "ein mann"), ("the sun", "die sonne")],
         "test_2016_flickr": [("a boy", "ein junge"), ("the sea", "das meer")]}


def _mirror(folder, pairs=PAIRS):
  """A folder laid out like Multi30k's raw files, served by file:// URL."""
  folder.mkdir()
  for stem, rows in pairs.items():
    for side, lang in enumerate(("en", "de")):
      with gzip.open(folder / f"{stem}.{lang}.gz", "wt", encoding="utf-8") as f:
        f.write("".join(row[side] + "\n" for row in rows))
  return folder.as_uri() + "/"


@pytest.fixture
def small_multi30k(monkeypatch, tmp_path):
  url = _mirror(tmp_path / "mirror")
  spec = dataclasses.replace(downloads.DOWNLOADS["multi30k"], url=url,
                             lines={stem: len(rows) for stem, rows in PAIRS.items()})
  monkeypatch.setitem(downloads.DOWNLOADS, "multi30k", spec)
  return tmp_path / "data"


def test_data_name_multi30k_downloads_once_and_builds_the_parallel_dataset(small_multi30k):
  config = tiny_config(**{"data.name": "multi30k", "data.path": "", "data.format": "parallel",
                          "data.data_dir": str(small_multi30k)})
  prepared = prepare(config.data)
  assert prepared.num_examples("train") == 3 and prepared.num_examples("test") == 2
  records = [prepared.sources["validation"][i] for i in range(2)]
  assert sorted((r["source"], r["target"]) for r in records) == sorted(PAIRS["val"])
  folder = small_multi30k / "downloads" / "multi30k"
  assert sorted(os.listdir(folder)) == sorted(downloads.DOWNLOADS["multi30k"].files())
  # The second run reads the kept files: the mirror may be gone.
  for name in os.listdir(small_multi30k.parent / "mirror"):
    os.remove(small_multi30k.parent / "mirror" / name)
  assert prepare(config.data).fingerprint == prepared.fingerprint


def test_a_wrong_format_for_a_download_is_a_clear_error(small_multi30k):
  config = tiny_config(**{"data.name": "multi30k", "data.path": "",
                          "data.data_dir": str(small_multi30k)})
  with pytest.raises(UserError, match="config.data.format: multi30k is a parallel dataset"):
    prepare(config.data)


def test_a_short_or_missing_file_is_refused_and_nothing_is_kept(monkeypatch, tmp_path):
  rows = dict(PAIRS, val=PAIRS["val"][:1])  # one line short of the expected two
  url = _mirror(tmp_path / "mirror", rows)
  spec = dataclasses.replace(downloads.DOWNLOADS["multi30k"], url=url,
                             lines={stem: len(r) for stem, r in PAIRS.items()})
  monkeypatch.setitem(downloads.DOWNLOADS, "multi30k", spec)
  with pytest.raises(UserError, match=r"val.en.gz has 1 lines, not the published 2"):
    downloads.fetch("multi30k", str(tmp_path / "data"))
  folder = tmp_path / "data" / "downloads" / "multi30k"
  assert sorted(os.listdir(folder)) == ["train.de.gz", "train.en.gz"]  # no partial file
  with pytest.raises(UserError, match=r"cannot download multi30k file .*nowhere/train.en.gz"):
    downloads.fetch("multi30k", str(tmp_path / "other"), url=(tmp_path / "nowhere").as_uri()
                    + "/")


def test_the_published_line_counts_match_the_real_files(tmp_path):
  if not os.path.isdir(MULTI30K):
    pytest.skip(f"shared data not found at {MULTI30K}")
  folder = downloads.fetch("multi30k", str(tmp_path), url="file://" + os.path.abspath(MULTI30K)
                           + "/")
  for name in downloads.DOWNLOADS["multi30k"].files():
    with open(os.path.join(folder, name), "rb") as a, open(os.path.join(MULTI30K, name),
                                                           "rb") as b:
      assert a.read() == b.read()
