"""Large JSON arrays encoded in blocks, so that serializing an answer never stalls the server.

orjson holds the GIL for the whole of one `dumps`: a 2 Mi-value answer took ~0.4 s here, and a
thread does not help while it holds the GIL (a 444 MB answer once stalled `/healthz` for 2.7 s,
issue #17). Encoded a block of rows at a time (each a few ms), the thread gives the GIL back
between blocks and the event loop keeps answering. The bytes are orjson's own, joined, inserted
into the document as an `orjson.Fragment`, so the answer is byte for byte what one `dumps` gives.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson

# ~3-5 ms of orjson per block on a busy 2-core host.
BLOCK_VALUES = 32 * 1024


def json_array(array: np.ndarray[Any, Any]) -> orjson.Fragment:
    """`array` as a JSON (nested) list, encoded `BLOCK_VALUES` values at a time along axis 0."""
    if array.size <= BLOCK_VALUES or array.ndim == 0 or len(array) <= 1:
        return orjson.Fragment(orjson.dumps(array, option=orjson.OPT_SERIALIZE_NUMPY))
    rows = max(1, BLOCK_VALUES // (array.size // len(array)))
    parts = [
        orjson.dumps(array[start : start + rows], option=orjson.OPT_SERIALIZE_NUMPY)[1:-1]
        for start in range(0, len(array), rows)
    ]
    return orjson.Fragment(b"[" + b",".join(parts) + b"]")
