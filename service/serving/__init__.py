"""Serving: versions loaded in eval mode, the batcher feeding them, the manager swapping them."""
