"""Uploaded checkpoints: read without running foreign code, validate, store as safetensors.

`reader` turns an uploaded file into a state_dict, `validation` checks it against an architecture
and `store` keeps the canonical bytes. Nothing is re-exported here, so importing the store does
not import torch.
"""
