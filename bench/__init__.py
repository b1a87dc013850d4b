"""Benchmarks: bnserve against its contenders, through real HTTP (`bench/serving.py`)."""
