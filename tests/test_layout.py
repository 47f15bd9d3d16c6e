"""The layout's promises: scripts import modules, never each other; inference starts light."""

import ast
import subprocess
import sys

import pytest

from conftest import ROOT

SCRIPTS = {"train", "inference", "export", "prepare_masks", "bench", "fetch_real_data", "score_masks"}


def imported_names(path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("path", sorted(ROOT.glob("*.py")), ids=lambda p: p.name)
def test_no_file_imports_a_script(path):
    assert not imported_names(path) & (SCRIPTS - {path.stem})


def test_inference_starts_without_coco_tensorboard_or_matplotlib():
    probe = "import sys, inference; print(sorted({m.split('.')[0] for m in sys.modules}))"
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    loaded = set(ast.literal_eval(result.stdout))
    assert "torch" in loaded  # the probe saw inference's imports
    assert not loaded & {"pycocotools", "tensorboard", "matplotlib"}
