"""Where models run: `BNSERVE_DEVICE` resolved against what this machine has."""

from __future__ import annotations

import torch


def resolve_device(setting: str) -> torch.device:
    """`auto` picks CUDA when present; an explicit device that is missing fails at start."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"BNSERVE_DEVICE={setting} but CUDA is not available here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise RuntimeError(
                f"BNSERVE_DEVICE={setting} but only {torch.cuda.device_count()} GPU(s) are visible"
            )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError(f"BNSERVE_DEVICE={setting} but MPS is not available here")
    return device


def release_memory(device: torch.device) -> None:
    """Hand freed blocks back to the driver after a version is evicted (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
