"""Utility: does a model trained on the release work on real data?

Synthetic data is only worth releasing if what it teaches carries over. This check
trains a small probe on the release's labelled images and scores it on held-out real
data (train on synthetic, test on real: TSTR); the same probe trained on real data
(TRTR) is the figure to aim for. A mix release is also split by `origin`, so the report
shows whether real + synthetic beats either alone. A floor on TSTR accuracy and a limit
on its fall since the previous release fail the gate.
"""

from __future__ import annotations

import os
from typing import Any, Literal

import numpy as np
from pydantic import Field, ValidationInfo, field_validator, model_validator

from synthfactory.checks.base import CHECKS, CheckParams, DatasetCheck, DatasetView, Findings, PreviousRelease
from synthfactory.checks.privacy_distance import image_rows, origin_mask, release_features, source_features
from synthfactory.sources.base import Source, build_source, resolve_source_spec

Probe = Literal["linear", "cnn"]
#: input side when `pixel_size` is not given: the linear probe reads coarse pixels, the CNN finds its own features
DEFAULT_PIXEL_SIZE: dict[Probe, int] = {"linear": 8, "cnn": 32}
CNN_BATCH = 64
#: test images scored at once: activations stay small whatever the test set's size
CNN_EVAL_BATCH = 1024


class UtilityParams(CheckParams):
    test: dict[str, Any] = Field(description="labelled real data the probe is scored on, as a source {kind, params}")
    train_real: dict[str, Any] | None = Field(
        None, description="real data (a source) to train the same probe on: the train-on-real reference figure",
    )
    probe: Probe = Field(
        "linear", description="linear: logistic regression on standardised pixels; cnn: a two-layer CNN (torch, CPU)",
    )
    pixel_size: int | None = Field(None, ge=1, le=128, description="side of the greyscale input; null: 8 (linear), 32 (cnn)")
    epochs: int = Field(15, ge=1, le=500, description="CNN training epochs (Adam, batches of 64)")
    seed: int = Field(0, description="seeds the training sample and the CNN")
    max_train_samples: int = Field(
        20_000, ge=10, le=1_000_000, description="a bigger release is sampled (seeded) down to this many for training",
    )
    min_accuracy: float | None = Field(None, ge=0, le=1, description="TSTR accuracy below this fails the gate")
    max_drop: float | None = Field(
        None, ge=0, le=1, description="a fall of TSTR accuracy since the previous release beyond this fails the gate",
    )

    @field_validator("test", "train_real", mode="before")
    @classmethod
    def _source(cls, value: Any, info: ValidationInfo) -> dict[str, Any] | None:
        return None if value is None else resolve_source_spec(info.field_name, value, info)

    @model_validator(mode="after")
    def _input_size(self) -> "UtilityParams":
        """Fill in the probe's input size, so the resolved recipe records it."""
        if self.pixel_size is None:
            object.__setattr__(self, "pixel_size", DEFAULT_PIXEL_SIZE[self.probe])
        elif self.probe == "cnn" and self.pixel_size < 4:
            raise ValueError(f"pixel_size: the cnn probe pools twice and needs at least 4, got {self.pixel_size}")
        return self


@CHECKS.register("utility")
class Utility(DatasetCheck):
    Params = UtilityParams
    version = "1"
    needs_images = True
    code = ("synthfactory.checks.privacy_distance", "synthfactory.checks.dedup", "synthfactory.quality.features",
            "synthfactory.quality.near_duplicates", "synthfactory.sources.base")
    params: UtilityParams

    def reads(self) -> list[Source]:
        return [build_source(spec, self.recipe_dir) for spec in (self.params.test, self.params.train_real) if spec]

    def evaluate(self, data: DatasetView, previous: PreviousRelease | None) -> Findings:
        p = self.params
        size = p.pixel_size
        assert size is not None  # filled in by the params
        test = source_features(p.test, self.recipe_dir, "pixels", size)
        unlabelled = [key for key, label in zip(test.keys, test.labels) if label is None]
        if unlabelled:
            raise ValueError(f"test: record {unlabelled[0]} of {test.origin} has no label; the probe is scored on labelled data")
        classes = sorted(set(test.labels))
        class_of = {label: i for i, label in enumerate(classes)}
        test_y = np.array([class_of[label] for label in test.labels])

        manifest = data.manifest
        if "label" not in manifest.column_names:
            raise ValueError("the release has no label column: the probe trains on labelled samples")
        labels = manifest.column("label").to_pylist()
        usable = image_rows(manifest) & np.array([label in class_of for label in labels], dtype=bool)
        if not usable.any():
            raise ValueError(f"no release sample has an image and one of the test labels {', '.join(classes)}")
        subsets = {"all": self._capped(np.flatnonzero(usable))}
        if "origin" in manifest.column_names:
            for origin in ("synthetic", "real"):
                rows = np.flatnonzero(usable & origin_mask(manifest, origin))
                if len(rows):
                    subsets[origin] = self._capped(rows)
        needed = np.unique(np.concatenate(list(subsets.values())))
        features = release_features(data, needed, "pixels", size)

        def accuracy(rows: np.ndarray) -> float:
            train_x = features[np.searchsorted(needed, rows)]
            train_y = np.array([class_of[labels[row]] for row in rows])
            return self._accuracy(train_x, train_y, test.features, test_y, len(classes))

        tstr = accuracy(subsets["all"])
        metrics: dict[str, float] = {
            "tstr_accuracy": round(tstr, 4),
            "train_samples": len(subsets["all"]),
            "test_samples": len(test_y),
            "ignored_samples": int((~usable).sum()),
        }
        for origin in ("synthetic", "real"):
            if origin in subsets:
                metrics[f"{origin}_only_accuracy"] = round(accuracy(subsets[origin]), 4)
        summary = (f"trained a {p.probe} probe on {len(subsets['all']):,} samples, tested on {len(test_y):,} real "
                   f"samples from {test.origin}: {tstr:.3f}")
        if p.train_real is not None:
            metrics["trtr_accuracy"] = round(self._train_on_real(class_of, test.features, test_y), 4)
            summary += f" (train-on-real {metrics['trtr_accuracy']:.3f})"
        notes = [summary]
        limits: dict[str, tuple[float | None, float | None]] = {}
        if p.min_accuracy is not None:
            limits["tstr_accuracy"] = (p.min_accuracy, None)
        before = _previous_accuracy(previous, self.plugin_name)
        if before is not None:
            metrics["tstr_drop"] = round(before - metrics["tstr_accuracy"], 4)
            if p.max_drop is not None:
                limits["tstr_drop"] = (None, p.max_drop)
        elif previous is not None and p.max_drop is not None:
            notes.append(f"{previous.tag} has no utility tstr_accuracy; max_drop not applied")
        return Findings(metrics, limits, notes=notes)

    def _capped(self, rows: np.ndarray) -> np.ndarray:
        """At most max_train_samples of `rows`, a seeded sample, in row order."""
        if len(rows) <= self.params.max_train_samples:
            return rows
        return np.sort(np.random.default_rng(self.params.seed).choice(rows, self.params.max_train_samples, replace=False))

    def _train_on_real(self, class_of: dict[str, int], test_x: np.ndarray, test_y: np.ndarray) -> float:
        """TRTR: the probe trained on `train_real`'s records whose label the test set has."""
        assert self.params.train_real is not None and self.params.pixel_size is not None
        real = source_features(self.params.train_real, self.recipe_dir, "pixels", self.params.pixel_size)
        rows = self._capped(np.array([i for i, label in enumerate(real.labels) if label in class_of], dtype=np.int64))
        if not len(rows):
            raise ValueError(f"train_real: no record of {real.origin} has one of the test labels {', '.join(class_of)}")
        train_y = np.array([class_of[real.labels[i]] for i in rows])
        return self._accuracy(real.features[rows], train_y, test_x, test_y, len(class_of))

    def _accuracy(self, train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                  classes: int) -> float:
        if len(np.unique(train_y)) == 1:  # nothing to separate: the probe can only answer that class
            predicted = np.full(len(test_y), train_y[0])
        elif self.params.probe == "linear":
            predicted = _linear_probe(train_x, train_y, test_x)
        else:
            predicted = _cnn_probe(train_x, train_y, test_x, classes, self.params)
        return float(np.mean(predicted == test_y))


def _linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray) -> np.ndarray:
    """Logistic regression on standardised pixels: a fixed, cheap reading of what the data teaches."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(train_x, train_y).predict(test_x)


def _cnn_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, classes: int, params: UtilityParams) -> np.ndarray:
    """A two-layer CNN trained with Adam; seeded, on at most 2 CPU threads (so the same
    release gives the same figure on any machine with 2 cores or more), and without
    disturbing the process's own RNG or thread count."""
    import torch
    from torch import nn

    size = params.pixel_size
    assert size is not None
    mean, std = float(train_x.mean()), float(train_x.std()) or 1.0

    def images(rows: np.ndarray) -> torch.Tensor:
        return ((torch.from_numpy(np.array(rows, dtype=np.float32)) - mean) / std).reshape(-1, 1, size, size)

    threads = torch.get_num_threads()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(params.seed)
            model = nn.Sequential(
                nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(32 * 4 * 4, classes),
            )
            optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
            shuffle = torch.Generator().manual_seed(params.seed)
            x, y = images(train_x), torch.from_numpy(train_y.astype(np.int64))
            model.train()
            for _ in range(params.epochs):
                for batch in torch.randperm(len(x), generator=shuffle).split(CNN_BATCH):
                    optimiser.zero_grad()
                    nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
                    optimiser.step()
            model.eval()
            with torch.no_grad():
                return np.concatenate([model(images(test_x[lo : lo + CNN_EVAL_BATCH])).argmax(dim=1).numpy()
                                       for lo in range(0, len(test_x), CNN_EVAL_BATCH)])
    finally:
        torch.set_num_threads(threads)


def _previous_accuracy(previous: PreviousRelease | None, check: str) -> float | None:
    if previous is None:
        return None
    return previous.metrics.get("quality", {}).get(check, {}).get("tstr_accuracy")
