"""Recipe inputs that live in files next to the recipe (concept lists, example pools).

At recipe load the file is read (relative to the recipe's directory) and its content
stored in the resolved params beside the file name, so the recipe saved with a release
is self-contained and its fingerprint changes when the file does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationInfo

#: key of the pydantic validation context that holds the recipe's directory
RECIPE_DIR = "recipe_dir"


def input_path(file: str, info: ValidationInfo) -> Path:
    base = Path((info.context or {}).get(RECIPE_DIR, "."))
    return (base / file).resolve()


def read_lines(file: str, info: ValidationInfo) -> tuple[str, ...]:
    """Non-empty lines, '#' comments dropped; ValueError (-> a recipe error) if unreadable."""
    path = input_path(file, info)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    lines = tuple(line.strip() for line in text.splitlines())
    return tuple(line for line in lines if line and not line.startswith("#"))


def read_yaml_list(file: str, info: ValidationInfo) -> list[Any]:
    path = input_path(file, info)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(data, list):
        raise ValueError(f"{path} must hold a YAML list, got {type(data).__name__}")
    return data
