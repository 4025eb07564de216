"""Recipe inputs that live in files next to the recipe (concept lists, example pools).

At recipe load the file is read (relative to the recipe's directory) and its content
stored in the resolved params beside the file name, so the recipe saved with a release
is self-contained and its fingerprint changes when the file does.
"""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationInfo

from synthfactory.plugins import RECIPE_DIR
#: the most a recipe input file may hold: its content is inlined into the released recipe
MAX_INPUT_BYTES = 16 * 1024 * 1024


def input_path(field: str, file: str, info: ValidationInfo) -> Path:
    """The regular file `file` names inside the recipe's directory. Recipes and `--set`
    values (a UI parameter) are untrusted: an absolute path, `..`, a symlink leading
    out, a device or /proc file would publish what the worker can read (its keys)."""
    base = Path((info.context or {}).get(RECIPE_DIR, ".")).resolve()
    path = (base / file).resolve()
    if Path(file).is_absolute() or not path.is_relative_to(base):
        raise ValueError(f"{field}: {file!r} must be a path inside the recipe's directory {base}")
    try:
        status = path.stat()
    except OSError as exc:
        raise ValueError(f"{field}: cannot read {file!r}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(status.st_mode):
        raise ValueError(f"{field}: {file!r} is not a regular file")
    if status.st_size > MAX_INPUT_BYTES:
        raise ValueError(f"{field}: {file!r} holds {status.st_size} bytes, more than the {MAX_INPUT_BYTES} a recipe input may")
    return path


def read_text(field: str, file: str, info: ValidationInfo) -> str:
    path = input_path(field, file, info)
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_INPUT_BYTES + 1)
    except OSError as exc:
        raise ValueError(f"{field}: cannot read {file!r}: {exc.strerror or exc}") from None
    if len(data) > MAX_INPUT_BYTES:  # grew since the check
        raise ValueError(f"{field}: {file!r} holds more than the {MAX_INPUT_BYTES} bytes a recipe input may")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{field}: {file!r} is not UTF-8 text") from None


def read_lines(field: str, file: str, info: ValidationInfo) -> tuple[str, ...]:
    """Non-empty lines, '#' comments dropped; ValueError (-> a recipe error) if unreadable."""
    lines = tuple(line.strip() for line in read_text(field, file, info).splitlines())
    return tuple(line for line in lines if line and not line.startswith("#"))


def read_yaml_list(field: str, file: str, info: ValidationInfo) -> list[Any]:
    try:
        data = yaml.safe_load(read_text(field, file, info))
    except yaml.YAMLError as exc:
        raise ValueError(f"{field}: {file!r} is not valid YAML: {exc}") from None
    if not isinstance(data, list):
        raise ValueError(f"{field}: {file!r} must hold a YAML list, got {type(data).__name__}")
    return data
