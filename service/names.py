"""The rule for model names, shared by the registry and the API schemas (which the client imports).

Its own module so that `service.client` can use the schemas without importing the registry (and
with it SQLAlchemy and PyTorch): a CLI command answers in a fraction of a second.
"""

from __future__ import annotations

import re

# Names end up in URLs and log lines, never in paths (files are keyed by the model's id).
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
