"""Real + synthetic end to end: the digits recipe releases with its privacy distances and
utility in metrics.json (and `dvc metrics diff`); a blend of real digits, that release
(read back through DVC from S3 in a fresh clone) and newly rendered digits records each
sample's origin, holds its counts, and traces its lineage to depth 2."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from synthfactory.registry import DataRegistry, dvc_executable
from synthfactory.release.gate import GateFailedError
from synthfactory.shards import read_manifest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_digits_release_and_a_real_synthetic_blend_with_lineage(tmp_path, storage_env, prefect):
    from flows.release import run_release

    registry = tmp_path / "registry"
    digits = str(ROOT / "recipes/digits.yaml")
    assert run_release(digits, str(registry), samples=300, overrides=["shard_size=150"]).tag == "digits@v1"
    assert run_release(digits, str(registry), samples=300, seed=7, overrides=["shard_size=150"]).tag == "digits@v2"
    metrics = json.loads((registry / "data/digits/metrics.json").read_text())
    utility, privacy = metrics["quality"]["utility"], metrics["quality"]["privacy-distance"]
    assert 0.3 < utility["tstr_accuracy"] <= 1 and utility["test_samples"] == 539 and utility["trtr_accuracy"] > 0.7
    assert privacy["samples"] - privacy["near_copies"] == metrics["samples"]  # near copies were refused
    assert privacy["reference"] == 1258 and privacy["dcr_median"] > 0.05 and privacy["holdout_dcr_median"] > 0
    assert metrics["lineage"]["depth"] == 1
    report = (registry / "data/digits/report/index.html").read_text()
    assert "<h2>Utility</h2>" in report and "<h2>Privacy</h2>" in report and "<h2>Lineage</h2>" in report
    card = (registry / "data/digits/README.md").read_text()
    assert "`sklearn-digits` `sklearn.datasets.load_digits` at `sklearn-" in card and "licence CC-BY-4.0" in card
    diff = subprocess.run([dvc_executable(), "metrics", "diff", "digits@v1", "digits@v2", "--json"],
                          cwd=registry, capture_output=True, text=True, check=True)
    changes = json.loads(diff.stdout)["data/digits/metrics.json"]
    assert "quality.utility.tstr_accuracy" in changes and "quality.privacy-distance.dcr_median" in changes

    # A fresh clone has no DVC cache: the blend reads digits@v1's shards from S3.
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "--quiet", str(registry), str(clone)], check=True)
    recipe = clone / "recipes" / "blend.yaml"
    recipe.parent.mkdir(exist_ok=True)
    recipe.write_text(yaml.safe_dump({
        "name": "blend", "samples": 300, "shard_size": 150,
        "generator": {"kind": "mix", "params": {"image_size": 32, "components": [
            {"source": {"kind": "sklearn-digits", "params": {"split": "train", "limit": 100}}, "count": 100, "name": "real"},
            {"release": "digits@v1", "count": 100},
            {"generator": {"kind": "digits"}, "count": 100, "name": "rendered"},
        ]}},
        "lineage": {"models": [{"name": "digits", "trained_on": ["digits@v1"]}]},  # as if fitted to v1: depth 2
        "checks": [{"kind": "dedup", "params": {"image_max_distance": None}}],
    }))
    summary = run_release(str(recipe), str(clone), publish=False)
    release = clone / "data" / "blend"
    manifest = read_manifest(release).to_pylist()
    assert summary.samples == len(manifest) == 300
    by_source = {name: [row for row in manifest if row["source"] == name] for name in ("real", "digits@v1", "rendered")}
    assert {name: len(rows) for name, rows in by_source.items()} == {"real": 100, "digits@v1": 100, "rendered": 100}
    assert {row["origin"] for row in by_source["real"]} == {"real"}
    assert {row["origin"] for row in by_source["digits@v1"] + by_source["rendered"]} == {"synthetic"}
    v1_commit = DataRegistry.existing(registry).git("rev-list", "-n", "1", "digits@v1").strip()
    assert {row["source_revision"] for row in by_source["digits@v1"]} == {v1_commit}
    v1_keys = set(read_manifest(registry / "data/digits").column("key").to_pylist())
    assert {row["source_key"] for row in by_source["digits@v1"]} <= v1_keys
    blend = json.loads((release / "metrics.json").read_text())
    assert blend["lineage"]["depth"] == 2
    assert [parent["tag"] for parent in blend["lineage"]["parents"]] == ["digits@v1"]
    gate = json.loads((release / "validation" / "result.json").read_text())
    assert gate["success"] and "source_balance" in gate["validations"]

    with pytest.raises(GateFailedError, match="lineage_depth"):
        run_release(str(recipe), str(clone), publish=False, overrides=["lineage.max_depth=1"])
