"""examples/train_worldmodel.py end to end: a small driving release made by the real flow
(--no-publish), then the example's action-conditioned next-frame model trained on it,
which must beat the copy-last-frame baseline on the held-out shard."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIGURES = re.compile(
    r"held-out next-frame MSE: model (?P<model>\S+) vs copy-last-frame (?P<copy>\S+) \((?P<ratio>\S+)x\) "
    r"on (?P<transitions>\d+) transitions"
)
SHUFFLED = re.compile(r"the same model given shuffled actions: (?P<mse>\S+) ")


@pytest.mark.slow
def test_world_model_beats_copy_last_frame_on_held_out_driving_clips(tmp_path: Path) -> None:
    registry = tmp_path / "registry"
    run = subprocess.run(
        [sys.executable, "-m", "synthfactory.cli", "run", str(ROOT / "recipes/driving.yaml"), "--registry", str(registry),
         "--no-publish", "--samples", "16", "--set", "shard_size=4", "--set", "validation.min_accept_rate=0.1"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    release = registry / "data" / "driving"  # a release directory, read in place like --registry of train_shapes.py

    # 3 shards trained on (~17 clips, ~120 transitions), the last held out; one thread, so
    # a busy 2-core machine does not stall torch's intra-op threads
    train = subprocess.run(
        [sys.executable, str(ROOT / "examples/train_worldmodel.py"), "--registry", str(release), "--holdout", "1",
         "--epochs", "15", "--threads", "1", "--cache-dir", str(tmp_path / "cache")],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    output = train.stdout + train.stderr
    assert train.returncode == 0, output[-3000:]
    assert "holding out ['driving-000003.tar']" in train.stdout, output[-3000:]
    figures = FIGURES.search(train.stdout)
    assert figures, output[-3000:]
    model, copy_last = float(figures["model"]), float(figures["copy"])
    assert int(figures["transitions"]) > 0
    assert math.isfinite(model) and math.isfinite(copy_last) and copy_last > 0, train.stdout[-2000:]
    # the scene scrolls with the ego speed and jumps with lane changes: a learned model beats
    # copying the last frame by far (0.4-0.5x here), not by noise
    assert model < 0.8 * copy_last, train.stdout[-2000:]
    # and it uses the action: other transitions' actions make its prediction worse
    shuffled = SHUFFLED.search(train.stdout)
    assert shuffled and float(shuffled["mse"]) > model, train.stdout[-2000:]
