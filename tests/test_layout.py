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


@pytest.mark.parametrize("path", sorted([*ROOT.glob("*.py"), *ROOT.glob("benchmarks/*.py")]), ids=lambda p: p.name)
def test_one_voice_no_module_prints_past_the_logger(path):
    """Every message to the user goes through logging (cli.Console: stdout, stderr for warnings, tqdm-aware)."""
    calls = [
        node.lineno
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Call)
        and (
            getattr(node.func, "id", None) == "print"
            or (getattr(node.func, "attr", None) == "write" and getattr(node.func.value, "id", None) == "tqdm")
        )
    ]
    assert path.name == "cli.py" and len(calls) == 1 or not calls, f"{path.name}: print/tqdm.write at lines {calls}"


def test_the_console_sends_info_to_stdout_and_warnings_to_stderr_as_they_are_now(capsys):
    import logging

    from cli import setup_logging

    setup_logging()
    setup_logging()  # once: no second handler, no line twice
    log = logging.getLogger("a.module")
    log.info("a line")
    log.warning("a warning")
    out, err = capsys.readouterr()  # capsys replaced the streams after the handler was made
    assert out.count("a line") == 1 and "a warning" in err and "a warning" not in out
