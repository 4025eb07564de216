"""HF-style dataset card (README.md with YAML front matter) for a release.

The card states provenance (recipe, generator, seeds), contents, the gate's verdict and
how to load the data, and holds no timestamps or run-dependent figures, so the same
recipe and code give the same card.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import yaml

from synthfactory.recipe import Recipe
from synthfactory.release.cost import describe_usage
from synthfactory.sources.base import Origin

_SIZE_CATEGORIES = [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")]


def _size_category(n: int) -> str:
    return next((label for bound, label in _SIZE_CATEGORIES if n < bound), "n>1M")


def render_card(
    recipe: Recipe,
    metrics: dict[str, Any],
    gate_lines: list[str],
    code_files: Sequence[str],
    fingerprint: str,
    has_images: bool,
    models: Sequence[tuple[str, str, str]] = (),
    sources: Sequence[Origin] = (),
) -> str:
    """`fingerprint`: of the release's inputs; `models`: (role, id, revision) of every model the
    recipe ran; `sources`: the real data it read (mixed in, or measured against)."""
    front = {
        "pretty_name": recipe.name,
        "size_categories": [_size_category(metrics["samples"])],
        "task_categories": ["image-classification", "object-detection", "image-to-text"] if has_images else ["text-generation"],
        "tags": ["synthetic", "synthfactory", recipe.generator.kind],
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": "shards/*.tar"}]}],
    }
    if sources:
        front["source_datasets"] = sorted({f"{origin.kind}:{origin.uri}" for origin in sources})
        licences = sorted({origin.license for origin in sources})
        front["license"] = licences[0] if len(licences) == 1 else "other"
    labels = metrics.get("labels", {})
    label_rows = "\n".join(f"| {label} | {count} |" for label, count in labels.items())
    verdict = "\n".join(f"- {line}" for line in gate_lines)
    code = "\n".join(f"- `{path}`" for path in code_files)
    model_lines = "".join(f"\n- {role} model: `{ident}` at revision `{revision}`" for role, ident, revision in models)
    source_lines = "".join(f"\n  - `{origin.kind}` `{origin.uri}` at `{origin.revision}`, licence {origin.license}"
                           for origin in sources)
    lineage = metrics.get("lineage", {})
    parents = ", ".join(f"`{parent['tag']}` (depth {parent['depth']})" for parent in lineage.get("parents", []))
    trained = "; ".join(f"`{maker['name']}` trained on {', '.join(maker['trained_on'])}"
                        for maker in lineage.get("makers", []) if maker["trained_on"])
    lineage_lines = (f"\n- Synthetic generation depth: {lineage.get('depth', 0)}"
                     + (f"\n- Reuses releases: {parents}" if parents else "")
                     + (f"\n- Makers' training data (declared): {trained}" if trained else ""))
    usage = describe_usage(metrics)
    usage_section = f"\n## Cost and usage\n\n{usage} (prices from the recipe's `cost`).\n" if usage else ""
    return f"""---
{yaml.safe_dump(front, sort_keys=False).strip()}
---

# {recipe.name}

{recipe.description.strip() or "Synthetic dataset produced by synthfactory."}

## Provenance

- Generator: `{recipe.generator.kind}` (params below){model_lines}{lineage_lines}
- Real data read:{source_lines or " none"}
- Inputs fingerprint (recipe, the files it reads, the code): `{fingerprint}`
- Seed: `{recipe.seed}`; each sample's seed is derived from (seed, sample index) and stored in the manifest
- Code hashed into `dvc.lock` for this release:
{code}

## Contents

- {metrics["samples"]} samples in {metrics.get("shards", "?")} WebDataset shards (`shards/*.tar`,
  members `<key>.png|jpg`, `<key>.json`, `<key>.txt`)
- `manifest/*.parquet`: one row per sample (key, shard, caption, labels, generator, seed, sha256 of the payload),
  one Parquet file per shard, named like it (`pyarrow.parquet.read_table("manifest")` reads them all)
- `rejected.parquet`: {metrics["rejected"]} planned samples that were rejected, with the reason
  (`rejected/*.tar` keeps the samples a check refused)
- `metrics.json`: the figures `dvc metrics diff` compares between releases
- `validation/index.html`: the Great Expectations report of the release gate

| label | samples |
|---|---|
{label_rows or "| (unlabelled) | |"}

## Validation

{verdict}
{usage_section}
## Loading

```bash
dvc get <registry-url> data/{recipe.name} --rev {recipe.name}@v<N>
```

```python
import webdataset as wds
dataset = wds.WebDataset("data/{recipe.name}/shards/{recipe.name}-{{000000..{max(0, recipe.shard_count - 1):06d}}}.tar").decode("pil")
```

## Recipe

```yaml
{recipe.to_yaml().strip()}
```
"""
