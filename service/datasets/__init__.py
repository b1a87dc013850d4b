"""Uploaded training data: reading, checking and fingerprinting `.npz` / `.safetensors` files
and `.zip` / `.tar` archives of images in class folders."""
