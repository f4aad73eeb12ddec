"""Corpora that lm downloads itself because the TFDS catalog lacks them: Multi30k.

`data.name = "multi30k"` without `data.path` fetches the raw task-1 files
({train,val,test_2016_flickr}.{en,de}.gz) from the dataset's own repository once, into
`<data_dir>/downloads/multi30k`, and reads that folder as `data.path` (format "parallel").
Each file is downloaded to a temporary name, checked (it gunzips, and has the published
number of lines, the same in both languages) and only then renamed into place, so a broken
or interrupted download leaves nothing that a later run would trust.
"""

import dataclasses
import gzip
import os
import shutil
import tempfile
import urllib.request

from lm.errors import UserError


@dataclasses.dataclass(frozen=True)
class Download:
  format: str
  url: str  # the folder the files are fetched from (https:// or file://)
  lines: dict  # file stem -> its number of lines
  languages: tuple

  def files(self):
    return [f"{stem}.{lang}.gz" for stem in self.lines for lang in self.languages]


DOWNLOADS = {
    "multi30k": Download(
        format="parallel",
        url="https://raw.githubusercontent.com/multi30k/dataset/master/data/task1/raw/",
        lines={"train": 29000, "val": 1014, "test_2016_flickr": 1000},
        languages=("en", "de")),
}


def _count_lines(path):
  with gzip.open(path, "rt", encoding="utf-8") as f:
    return sum(1 for _ in f)


def fetch(name, data_dir, url=None):
  """The local folder holding download `name`'s files, fetching what is missing."""
  spec = DOWNLOADS[name]
  url = url or spec.url
  folder = os.path.join(data_dir, "downloads", name)
  os.makedirs(folder, exist_ok=True)
  for stem, expected in spec.lines.items():
    for lang in spec.languages:
      filename = f"{stem}.{lang}.gz"
      path = os.path.join(folder, filename)
      if os.path.exists(path):
        continue
      fd, partial = tempfile.mkstemp(dir=folder, prefix=f".{filename}.")
      try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url + filename,
                                                                timeout=60) as response:
          shutil.copyfileobj(response, out)
        found = _count_lines(partial)
        if found != expected:
          raise UserError(f"config.data.name: {name}: {url + filename} has {found} lines, "
                          f"not the published {expected}")
        os.replace(partial, path)
      except (OSError, EOFError, gzip.BadGzipFile, UnicodeDecodeError) as e:
        raise UserError(f"config.data.name: cannot download {name} file {url + filename} "
                        f"({type(e).__name__}: {e}); it downloads once and needs internet "
                        "for that; offline, point config.data.path at a folder of the "
                        "files") from None
      finally:
        if os.path.exists(partial):
          os.remove(partial)
  return folder
