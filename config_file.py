"""--config FILE and config.yaml: a run's flags as a YAML file, and a YAML file read back as the command-line
tokens that set those flags, each checked as its flag checks it."""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from errors import UserError
from files import not_a_file, replace_atomically
from utils import first_line

NOT_REPLAYED = ("config", "resume", "run_dir")  # a replayed config starts a new run in a new folder


def replayable_flags(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The flags a config file may set, by name: all but --help and NOT_REPLAYED."""
    return {a.dest: a for a in parser._actions if a.option_strings and a.dest not in ("help", *NOT_REPLAYED)}


def config_value_tokens(action: argparse.Action, value, where: str) -> list[str]:
    """One key of a config file as the command-line tokens that set it, each checked as the flag checks it."""
    flag = action.option_strings[0]
    if value is None and action.default is None:  # a flag whose default is chosen at run time (--channels-last)
        return []
    if isinstance(action, argparse.BooleanOptionalAction | argparse._StoreTrueAction):
        if not isinstance(value, bool):
            raise UserError(f"{where}: {value!r} is not true or false")
        if isinstance(action, argparse._StoreTrueAction):
            return [flag] if value else []
        return [flag if value else action.option_strings[1]]
    if value is None:
        return []
    if action.nargs is None and isinstance(value, list) and action.dest == "widths":
        value = ",".join(map(str, value))
    texts = [str(v) for v in value] if isinstance(value, list) else [str(value)]
    if len(texts) != (action.nargs if isinstance(action.nargs, int) else 1) or isinstance(value, dict):
        raise UserError(f"{where}: {value!r} is not what --{action.dest.replace('_', '-')} takes")
    for text in texts:
        try:
            converted = action.type(text) if action.type else text
        except (argparse.ArgumentTypeError, TypeError, ValueError) as err:
            raise UserError(f"{where}: {err}") from None
        if action.choices is not None and converted not in action.choices:
            raise UserError(f"{where}: {value!r} is not one of {', '.join(map(str, action.choices))}")
    return [flag, *texts]


def config_file_argv(path: Path, parser: argparse.ArgumentParser) -> list[str]:
    """A YAML file of flags (a run's config.yaml) as the command line that sets them; unknown keys and values
    of the wrong type are one-line errors naming the file and the key."""
    problem = not_a_file(path)
    if problem:
        raise UserError(f"{path}: {problem}, not a regular file (--config)")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as err:
        raise UserError(f"{path}: cannot read --config ({err.strerror or err})") from None
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not a YAML file ({first_line(err)})") from None
    if not isinstance(values, dict):
        raise UserError(f"{path}: expected flag names and values (key: value lines)")
    actions = replayable_flags(parser)
    argv = []
    for key, value in values.items():
        action = actions.get(str(key).replace("-", "_"))
        if action is None:
            raise UserError(f"{path}: unknown key {key!r} (not a train.py flag)")
        argv += config_value_tokens(action, value, f"{path}: {key}")
    return argv


def write_config(values: dict, path: Path, notes: list[str] = ()) -> None:
    """A run's replayable flags (config.replay_values) as YAML, where --config reads them back; notes go above them
    as comments, which a replay does not read."""
    comments = "".join(f"# {line}\n" for line in notes)
    with replace_atomically(path) as tmp:
        tmp.write_text(comments + yaml.safe_dump(values, sort_keys=False), encoding="utf-8")
