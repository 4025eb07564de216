"""Train a tiny CNN on the procedural `shapes` dataset, streamed by synthfactory.loader.

From a release (shards streamed out of S3 through DVC into the local shard cache):

    python examples/train_shapes.py --registry PATH --version 1

From a run still generating it (train-while-generate; start the run in `PATH` first):

    python examples/train_shapes.py --registry PATH --live

The last `--holdout` shards (by shard index) are never trained on; the script prints
the accuracy on them (5 classes: chance is 20 %). CPU, a few minutes at most.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from synthfactory.loader import ShardDataset, load
from synthfactory.settings import apply_offline_defaults

FIELDS = ["png", "label"]


def tiny_cnn(classes: int) -> nn.Module:
    def block(inputs: int, outputs: int) -> list[nn.Module]:
        return [nn.Conv2d(inputs, outputs, 3, padding=1), nn.BatchNorm2d(outputs), nn.ReLU(), nn.MaxPool2d(2)]

    return nn.Sequential(
        *block(3, 8), *block(8, 16), *block(16, 32), *block(32, 32),  # 64 px -> 4 px
        nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(32, classes),
    )  # fmt: skip


def as_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 C×H×W batches from the loader -> floats around 0."""
    return images.float().div_(127.5).sub_(1.0)


def train_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer) -> tuple[int, float, float]:
    """(samples, mean loss, accuracy) of one pass."""
    model.train()
    seen, loss_sum, correct = 0, 0.0, 0
    for batch in loader:
        logits = model(as_input(batch["png"]))
        loss = nn.functional.cross_entropy(logits, batch["label"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        seen += len(logits)
        loss_sum += loss.item() * len(logits)
        correct += (logits.argmax(1) == batch["label"]).sum().item()
    return seen, loss_sum / max(seen, 1), correct / max(seen, 1)


@torch.no_grad()
def accuracy(model: nn.Module, loader: DataLoader) -> tuple[int, float]:
    model.eval()
    seen = correct = 0
    for batch in loader:
        correct += (model(as_input(batch["png"])).argmax(1) == batch["label"]).sum().item()
        seen += len(batch["label"])
    return seen, correct / max(seen, 1)


def datasets(args: argparse.Namespace, fields: list[str] = FIELDS) -> tuple[ShardDataset, ShardDataset]:
    """(training shards, held-out shards) of the release or the live run (also what
    train_worldmodel.py reads its clips with)."""
    options = {"fields": fields, "cache_dir": args.cache_dir, "seed": args.seed, "shuffle_buffer": args.shuffle_buffer}
    if args.live:  # the run's feed names the classes, a release its recipe.yaml
        dataset = load(args.dataset, registry=args.registry, live=True, **options)
    else:
        dataset = load(args.dataset, args.version, args.registry, **options)
    return dataset.split(args.holdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--registry", type=Path, required=True, help="registry repo (a clone is enough) or release directory")
    parser.add_argument("--version", help="N, vN or shapes@vN (default: latest)")
    parser.add_argument("--live", action="store_true", help="follow the run in progress in --registry")
    parser.add_argument("--dataset", default="shapes")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--holdout", type=int, default=1, help="shards kept for the accuracy figure")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers (decoding is cheap; cores train)")
    parser.add_argument("--shuffle-buffer", type=int, default=512)
    parser.add_argument("--cache-dir", type=Path, default=None, help="shard cache (default: ~/.cache/synthfactory/shards)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    apply_offline_defaults()
    torch.manual_seed(args.seed)
    train, held_out = datasets(args)
    print(f"training on {train}\nholding out {held_out.shard_names}")
    model = tiny_cnn(len(train.classes or ()) or 5)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    train_loader = DataLoader(train, batch_size=args.batch_size, num_workers=args.workers, persistent_workers=args.workers > 0)
    started = time.perf_counter()
    for epoch in range(args.epochs):
        train.set_epoch(epoch)
        tick = time.perf_counter()
        seen, loss, train_accuracy = train_epoch(model, train_loader, optimizer)
        seconds = time.perf_counter() - tick
        print(f"epoch {epoch}: {seen} samples, loss {loss:.3f}, train accuracy {train_accuracy:.1%}, "
              f"{seconds:.1f} s ({seen / seconds:.0f} samples/s)")
    seen, test_accuracy = accuracy(model, DataLoader(held_out, batch_size=256, num_workers=args.workers))
    print(f"held-out accuracy: {test_accuracy:.1%} on {seen} samples (chance 20%); "
          f"trained in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
