"""Arrow dictionary columns as (values, integer codes): how the index keeps millions of repeated strings
(wells, folders, file names) as one small dictionary plus an int32 array."""

from __future__ import annotations

import numpy as np
import pyarrow as pa


def dictionary_codes(column: pa.ChunkedArray | pa.Array) -> tuple[pa.Array, np.ndarray]:
    """(dictionary, int32 code per row, -1 for null) of a dictionary column, chunks sharing one dictionary."""
    if isinstance(column, pa.Array):
        column = pa.chunked_array([column])
    if not pa.types.is_dictionary(column.type):
        column = pa.chunked_array([c.dictionary_encode() for c in column.chunks], )
    chunks = column.chunks
    if not chunks:
        return pa.array([], pa.string()), np.zeros(0, np.int32)
    first = chunks[0].dictionary
    if not all(_same_buffers(c.dictionary, first) for c in chunks[1:]):
        column = pa.table({"c": column}).unify_dictionaries()["c"]
        chunks = column.chunks
        first = chunks[0].dictionary
    parts = [(c.indices.fill_null(-1) if c.null_count else c.indices).to_numpy(zero_copy_only=False)
             for c in chunks]
    codes = parts[0] if len(parts) == 1 else np.concatenate(parts)
    return first, codes.astype(np.int32, copy=False)


def _same_buffers(a: pa.Array, b: pa.Array) -> bool:
    if len(a) != len(b):
        return False
    return all((x is None and y is None) or (x is not None and y is not None and x.address == y.address)
               for x, y in zip(a.buffers(), b.buffers())) or a.equals(b)
