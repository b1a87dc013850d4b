"""Serving: versions loaded in eval mode, the batcher that feeds them, the manager that swaps them."""
