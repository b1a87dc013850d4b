"""Uploaded training data: reading, checking and fingerprinting `.npz` / `.safetensors` files."""
