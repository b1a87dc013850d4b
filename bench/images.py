"""The image row of issue 15: 32x32 PNG predictions against the same samples sent as tensors.

One bnserve server (the `bnserve` contender) serves `seed_cnn` (3x32x32) created with an image
pipeline. `hey` posts the same sample as an `image/png` body and as the JSON body of the exact
float32 tensor bnserve's pipeline makes of it, alternately, at each client count, each round in a
rotated order; `png/tensor` is the per-round ratio of requests/s (its median is reported), so it
measures what decoding and preprocessing cost on the serving path, nothing else.
"""

from __future__ import annotations

import io
import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from PIL import Image

from bench.loadgen import Load
from service.preprocess.image import to_tensor
from service.preprocess.pipeline import ImagePipeline

MODEL = "img32"
ARCHITECTURE = "seed_cnn"
PIPELINE = {"mode": "RGB", "mean": [0.49, 0.48, 0.45], "std": [0.25, 0.24, 0.26]}
KINDS = {"png": "image/png", "tensor": "application/json"}


def prepare(run_dir: Path, weights: Callable[[str, dict[str, Any]], Any]) -> dict[str, Any]:
    """The weights, a seeded 32x32 RGB PNG and the JSON body of its pipeline tensor."""
    state = weights(ARCHITECTURE, {})
    path = run_dir / f"{MODEL}.pt"
    torch.save(state, path)
    pixels = np.random.default_rng(2).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="PNG")
    png = run_dir / f"{MODEL}.png"
    png.write_bytes(buffer.getvalue())
    x = to_tensor(ImagePipeline.model_validate(PIPELINE), Image.open(png))[None]
    body = run_dir / f"{MODEL}.json"
    # float64 repr of float32 values: the server's float32 conversion gives x exactly back.
    body.write_bytes(json.dumps({"inputs": x.double().tolist()}).encode())
    return {"weights": path, "bodies": {"png": png, "tensor": body}, "x": x, "state": state}


def set_up(url: str, auth: dict[str, str], spec: dict[str, Any]) -> None:
    """Create the image model, upload (and serve) its weights, and check both bodies' answers."""
    with httpx.Client(base_url=url, headers=auth, timeout=120) as client:
        client.post(
            "/v1/models",
            json={
                "name": MODEL,
                "architecture": ARCHITECTURE,
                "preprocess": {"image": PIPELINE},
            },
        ).raise_for_status()
        with spec["weights"].open("rb") as f:
            answer = client.post(f"/v1/models/{MODEL}/versions", files={"file": (f"{MODEL}.pt", f)})
        answer.raise_for_status()
        outputs = []
        for kind, media in KINDS.items():
            r = client.post(
                f"/v1/models/{MODEL}/predict",
                content=spec["bodies"][kind].read_bytes(),
                headers={"Content-Type": media},
            )
            if r.status_code != 200:
                raise RuntimeError(f"{MODEL} {kind} answered {r.status_code}: {r.text[:500]}")
            outputs.append(torch.tensor(r.json()["outputs"]))
    diff = float((outputs[0] - outputs[1]).abs().max())
    if diff > 1e-5:
        raise RuntimeError(f"{MODEL}: the PNG and tensor answers differ by {diff:.2e}")


def loads(url: str, spec: dict[str, Any]) -> dict[str, Load]:
    path = f"{url}/v1/models/{MODEL}/predict"
    return {kind: Load(path, spec["bodies"][kind], media) for kind, media in KINDS.items()}


def round_order(index: int) -> list[str]:
    kinds = list(KINDS)
    return kinds[index % 2 :] + kinds[: index % 2]


def summarize(rounds: list[dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """Per client count: median req/s of each body and the median per-round png/tensor ratio."""
    medians: dict[str, Any] = {}
    per_round: list[dict[str, float]] = []
    for result in rounds:
        ratios = {
            clients: row["png"]["rps"] / row["tensor"]["rps"]
            for clients, row in result.items()
            if row["tensor"]["rps"]
        }
        per_round.append(ratios)
    for clients in rounds[0]:
        medians[clients] = {
            f"{kind}_rps": statistics.median(r[clients][kind]["rps"] for r in rounds)
            for kind in KINDS
        }
        found = [r[clients] for r in per_round if clients in r]
        medians[clients]["png/tensor"] = statistics.median(found) if found else None
    return {
        "model": MODEL,
        "architecture": ARCHITECTURE,
        "pipeline": PIPELINE,
        "rounds": rounds,
        "ratios_per_round": per_round,
        "medians": medians,
    }


def table(summary: dict[str, Any]) -> str:
    lines = [
        "",
        f"images: {summary['architecture']} 3x32x32, PNG body vs the same sample as JSON",
        f"{'clients':>8}{'png req/s':>11}{'tensor req/s':>14}{'png/tensor':>12}",
    ]
    for clients, row in summary["medians"].items():
        ratio = row["png/tensor"]
        lines.append(
            f"{clients:>8}{row['png_rps']:>11.1f}{row['tensor_rps']:>14.1f}"
            f"{'-' if ratio is None else format(ratio, '.2f'):>12}"
        )
    return "\n".join(lines)
