"""Issue 16's loader row: a training job's samples/s with and without augmentation, same run.

The training loop a worker runs (`service.training.trainer.train`, fed as `run_job` feeds it)
trains `resnet18` (cifar stem) on a seeded image dataset of 32x32 RGB pixels, once as plain
tensors and once with augmentation built by `BNSERVE_LOADER_THREADS` loader threads beside the
step, alternating in rounds so the machine's drift hits both alike. Each measurement is one job
of `--epochs` epochs; samples/s counts the training samples the steps consumed (validation left
out, `val_fraction` 0). The issue's target is augmented/plain >= 0.9.

    .venv/bin/python bench/augment.py [--images 512] [--epochs 1] [--rounds 3] [--threads 2]
        [--loader-threads 2] [--json bench/results/augment.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from models import get_architecture
from service.preprocess.image import normalize
from service.training.loader import TrainingImages
from service.training.trainer import TrainParams, train

MEAN = (0.49, 0.48, 0.45)
STD = (0.25, 0.24, 0.26)
# A CIFAR-style recipe and then some: every transform that changes pixels at 32x32.
AUGMENT: dict[str, Any] = {
    "random_crop": {"size": 32, "padding": 4},
    "hflip": 0.5,
    "rotation": 10.0,
    "color_jitter": {"brightness": 0.2, "contrast": 0.2, "saturation": 0.2, "hue": 0.05},
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--loader-threads", type=int, default=2)
    parser.add_argument(
        "--json", type=Path, default=Path(__file__).parent / "results" / "augment.json"
    )
    return parser.parse_args()


def one_job(
    pixels: np.ndarray, labels: torch.Tensor, args: argparse.Namespace, augment: bool
) -> float:
    """Samples/s of one training job on these pixels."""
    arch = get_architecture("resnet18")
    torch.manual_seed(0)
    model = arch.build(arch.parse_config({"stem": "cifar", "num_classes": 10}))
    params = TrainParams.model_validate(
        {
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "lr": 0.05,
            "seed": 0,
            "val_fraction": 0.0,
            "augment": AUGMENT if augment else None,
        }
    )
    images = TrainingImages(pixels, MEAN, STD, args.loader_threads) if augment else None
    x = normalize(pixels, MEAN, STD)
    started = time.perf_counter()
    train(
        model,
        x,
        labels,
        task="classification",
        params=params,
        should_stop=lambda: False,
        images=images,
    )
    return float(args.epochs * len(pixels) / (time.perf_counter() - started))


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (args.images, 32, 32, 3), dtype=np.uint8)
    labels = torch.from_numpy(rng.integers(0, 10, args.images))
    one_job(pixels[:64], labels[:64], argparse.Namespace(**{**vars(args), "epochs": 1}), True)
    rows: list[dict[str, float]] = []
    for r in range(args.rounds):
        order = (False, True) if r % 2 == 0 else (True, False)
        row = {("augmented" if a else "plain"): one_job(pixels, labels, args, a) for a in order}
        row["ratio"] = row["augmented"] / row["plain"]
        rows.append(row)
        print(
            f"round {r + 1}/{args.rounds}: plain {row['plain']:.1f} samples/s, augmented "
            f"{row['augmented']:.1f} samples/s, augmented/plain {row['ratio']:.3f}",
            flush=True,
        )
    summary = {
        "model": "resnet18 (cifar stem), 32x32 RGB",
        "images": args.images,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "torch_threads": args.threads,
        "loader_threads": args.loader_threads,
        "augment": AUGMENT,
        "rounds": rows,
        "median": {k: statistics.median(r[k] for r in rows) for k in rows[0]},
        "target": "augmented/plain >= 0.9",
    }
    median = summary["median"]
    print(
        f"median: plain {median['plain']:.1f}, augmented {median['augmented']:.1f} samples/s, "
        f"augmented/plain {median['ratio']:.3f} (target >= 0.9: "
        f"{'met' if median['ratio'] >= 0.9 else 'missed'})"
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"written to {args.json}")


if __name__ == "__main__":
    main()
