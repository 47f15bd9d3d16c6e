"""The documentation against the code: the README stays short and starts with the two commands, every flag of
every script has a row on its page (a new flag without one fails here), the defaults those rows state are the
parsers', and links point at files that exist."""

from __future__ import annotations

import argparse
import importlib
import re

import pytest

from conftest import ROOT

SCRIPT_PAGES = {
    "train_flags": "training.md",  # train.py's parser
    "inference": "inference.md",
    "export": "inference.md",
    "score_masks": "inference.md",
    "prepare_masks": "data.md",
    "fetch_real_data": "data.md",
    "bench": "performance.md",
}
ROW_FLAG = re.compile(r"`(--[a-z][a-z0-9_-]*)")


def parser_of(module: str) -> argparse.ArgumentParser:
    return importlib.import_module(module).get_args_parser()


def table_rows(page: str) -> list[str]:
    return [line for line in (ROOT / "docs" / page).read_text().splitlines() if line.startswith("| `--")]


def flags_in_first_cell(row: str) -> list[str]:
    return ROW_FLAG.findall(row.split("|")[1])


def test_the_readme_is_short_and_starts_with_the_two_commands():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    first_block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    assert "pip install -r requirements.txt && python train.py" in first_block
    assert "python -m pytest -q tests" in first_block
    assert ".ci/run" not in text or "python -m pytest -q tests" in (ROOT / ".ci/run").read_text()


@pytest.mark.parametrize("module", SCRIPT_PAGES)
def test_every_flag_has_one_row_on_its_page(module):
    page = SCRIPT_PAGES[module]
    documented = [flag for row in table_rows(page) for flag in flags_in_first_cell(row)]
    for action in parser_of(module)._actions:
        for flag in (option for option in action.option_strings if option.startswith("--") and option != "--help"):
            assert flag in documented, f"{flag} of {module}.py has no row in docs/{page}"


@pytest.mark.parametrize("module", sorted(SCRIPT_PAGES))
def test_every_flag_takes_both_spellings(module):
    """One flag style for every script: --input_dir and --input-dir, --data-root and --data_root, --x=1 too."""
    parser = parser_of(module)
    for action in parser._actions:
        for flag in [s for s in action.option_strings if s.startswith("--") and ("-" in s[2:] or "_" in s[2:])]:
            other = "--" + (flag[2:].replace("-", "_") if "-" in flag[2:] else flag[2:].replace("_", "-"))
            assert parser._known_spelling(other) == flag and parser._known_spelling(f"{other}=1") == f"{flag}=1"


def test_no_flag_is_documented_twice_on_a_page():
    for page in set(SCRIPT_PAGES.values()):
        seen = [flag for row in table_rows(page) for flag in flags_in_first_cell(row)]
        # one page may document several scripts whose flags share a name (inference.py's and export.py's --ema)
        shared = {"--checkpoint", "--overwrite", "--ema", "--no-ema", "--workers", "--max-pixels", "--batch-size"}
        shared |= {"--device", "--images", "--ignore-value", "--binary", "--mode", "--output_dir", "--output-dir"}
        twice = {flag for flag in seen if seen.count(flag) > 1} - shared
        assert not twice, f"docs/{page} documents {sorted(twice)} more than once"


def stated_default(cell: str) -> str:
    """The default a row states: its first word, without backticks."""
    return cell.strip().split(" (")[0].strip("`").strip()


def same_value(stated: str, default) -> bool:
    if isinstance(default, bool):
        return stated == ("on" if default else "off")
    if isinstance(default, (tuple, list)):  # 64,128 or 6000x4000 or 20000x20000,60000x60000
        flat = [v for item in default for v in (item if isinstance(item, (tuple, list)) else [item])]
        return [float(v) for v in re.split(r"[ ,x]+", stated)] == [float(v) for v in flat]
    if isinstance(default, (int, float)):
        return float(stated.replace(",", "")) == float(default)
    return stated == str(default)


@pytest.mark.parametrize("module", SCRIPT_PAGES)
def test_the_defaults_a_page_states_are_the_parsers(module):
    """Rows of one flag whose default cell starts with a value (not a description) must state the parser's."""
    actions = {option: action for action in parser_of(module)._actions for option in action.option_strings}
    checked = 0
    for row in table_rows(SCRIPT_PAGES[module]):
        flags = flags_in_first_cell(row)
        cells = row.split("|")
        if len(flags) != 1 or len(cells) < 4 or flags[0] not in actions:
            continue
        action, stated = actions[flags[0]], stated_default(cells[2])
        if action.default in (None, "", argparse.SUPPRESS) or not stated:
            continue
        described = not re.fullmatch(r"[\w.,\- ]+", stated) or (
            stated[0].isalpha() and not isinstance(action.default, str)
        )
        if described and not isinstance(action.default, bool):
            continue  # a description ("one per core", "the training crop"), not a value
        assert same_value(stated, action.default), f"docs: {flags[0]} default {stated!r}, parser {action.default!r}"
        checked += 1
    assert checked or module in ("fetch_real_data",)


def test_the_parameter_count_the_docs_state_is_the_models():
    from model import ResidualAttnUNet, count_parameters
    from presets import REFERENCE_WIDTHS

    text = (ROOT / "docs/training.md").read_text()
    stated = re.search(r"64,128,256,512\) give ([\d,]+) parameters for (\d+) classes", text)
    classes, count = int(stated.group(2)), int(stated.group(1).replace(",", ""))
    assert count_parameters(ResidualAttnUNet(3, classes, REFERENCE_WIDTHS)) == count


def test_links_point_at_files_that_exist():
    pages = [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if not target.startswith("http"):
                assert (page.parent / target).exists(), f"{page.name} links to {target}, which does not exist"


def change_map() -> list[str]:
    """docs/development.md's "Where to change what" bullets, each joined into one line."""
    text = (ROOT / "docs/development.md").read_text().split("### Where to change what", 1)[1]
    return [" ".join(bullet.split()) for bullet in re.split(r"\n- ", text)[1:]]


def test_the_change_map_names_files_and_functions_that_exist():
    for bullet in change_map():
        for token in re.findall(r"`([^`]+)`", bullet):
            if token.endswith(".py"):
                assert (ROOT / token).is_file(), f"{token} does not exist ({bullet[:40]})"
            elif re.fullmatch(r"[a-z_]+(\.[A-Za-z_]+)+", token) and (ROOT / f"{token.split('.')[0]}.py").is_file():
                module, *names = token.split(".")
                found = importlib.import_module(module)
                for name in names:
                    found = getattr(found, name)  # fails where the map names what is not there
        for module, names in re.findall(r"`([a-z_]+)\.py` \(([^)]*)\)", bullet):
            for name in re.findall(r"`([A-Za-z_.]+)`", names):
                found = importlib.import_module(module)
                for part in name.split("."):
                    found = getattr(found, part)


def test_each_ordinary_change_touches_at_most_two_code_files():
    """The four changes a newcomer makes most (docs/development.md), flags, settings and tests aside."""
    aside = {"train_flags.py", "settings.py"}
    for bullet in change_map()[:4]:
        files = {f for f in re.findall(r"`([a-z_/]+\.py)`", bullet) if not f.startswith("tests/")} - aside
        assert 1 <= len(files) <= 2, bullet[:60]
