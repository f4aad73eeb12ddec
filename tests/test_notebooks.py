"""colab/*.ipynb: each runs top to bottom (tiny settings) and shows real, labelled figures."""

import base64
import glob
import os
import re

import pytest

from conftest import REPO

NOTEBOOKS = sorted(glob.glob(os.path.join(REPO, "colab", "*.ipynb")))
SHARED = os.path.join(REPO, "..", "shared", "data")
# What a notebook reads besides the repository; missing, its run is skipped (offline, the
# notebook itself would download it).
NEEDS = {"finetune_classification.ipynb": os.path.join(SHARED, "sst2"),
         "translation.ipynb": os.path.join(SHARED, "multi30k")}
# At least this many figures (PNG outputs) per notebook.
FIGURES = {"quickstart.ipynb": 1, "interpretability.ipynb": 4,  # 2 tiny layers: 2 + lens + loss
           "finetune_classification.ipynb": 2, "translation.ipynb": 1}
PNG = b"\x89PNG\r\n\x1a\n"


def _read(path):
  import nbformat  # pylint: disable=import-outside-toplevel
  return nbformat.read(path, as_version=4)


def test_the_four_notebooks_exist_and_are_committed_without_outputs():
  assert sorted(map(os.path.basename, NOTEBOOKS)) == sorted(FIGURES)
  for path in NOTEBOOKS:
    for cell in _read(path).cells:
      if cell.cell_type == "code":
        assert not cell.outputs and cell.execution_count is None, path


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_each_notebook_opens_in_colab_and_installs_lm_there(path):
  nb = _read(path)
  name = os.path.basename(path)
  badge = re.search(r"\(https://colab\.research\.google\.com/github/([\w.-]+/[\w.-]+)/blob/"
                    r"main/(\S+)\)", nb.cells[0].source)
  assert badge and badge.group(2) == f"colab/{name}", "the badge opens this notebook"
  install = nb.cells[1].source
  assert 'if "google.colab" in sys.modules' in install  # skipped outside Colab
  assert f"github.com/{badge.group(1)} " in install and "pip install" in install


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs_top_to_bottom_on_tiny_settings(path, tmp_path, monkeypatch):
  from nbclient import NotebookClient  # pylint: disable=import-outside-toplevel
  name = os.path.basename(path)
  if name in NEEDS and not os.path.isdir(NEEDS[name]):
    pytest.skip(f"shared data not found at {NEEDS[name]}")
  monkeypatch.setenv("LM_NOTEBOOK_TINY", "1")
  monkeypatch.delenv("XLA_FLAGS", raising=False)  # one CPU device, as a user's kernel has
  for variable in ("LM_WORKDIR", "LM_MULTI30K_WORKDIR"):
    monkeypatch.delenv(variable, raising=False)
  nb = _read(path)
  # Runs in a fresh folder, where the notebook writes its runs/; any cell error raises.
  NotebookClient(nb, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": str(tmp_path)}}).execute()
  images = [base64.b64decode(output["data"]["image/png"])
            for cell in nb.cells if cell.cell_type == "code" for output in cell.outputs
            if "image/png" in output.get("data", {})]
  assert len(images) >= FIGURES[name]
  assert all(image.startswith(PNG) and len(image) > 5000 for image in images)
  assert os.path.isdir(tmp_path / "runs")
