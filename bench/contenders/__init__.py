"""The servers bnserve is measured against; each runs as `python -m bench.contenders.<name>`."""
