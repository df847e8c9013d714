"""Data pipeline: sources -> tokenised memory-mapped cache -> packed, seeded batches.

```python
docs = read_documents(["corpus/", "extra.jsonl.gz"])          # iterator of str
cache = build_token_cache(paths, tokenizer, "cache/")          # .train / .heldout uint32 memmaps
for batch in PackedBatches(cache.train, seq_len=512, batch_size=16, seed=0):  # LongTensor [16, 512]
    ...
recall = RecallRows(fraction=0.25, min_gap=128, seq_len=512)  # optional: passages repeated past the window
evals = heldout_windows(cache.heldout, seq_len=512, max_windows=64)
```
"""

from .batches import PackedBatches, heldout_windows
from .recall import RecallRows
from .sources import DataError, read_documents
from .token_cache import TokenCache, build_token_cache

__all__ = [
    "DataError",
    "PackedBatches",
    "RecallRows",
    "TokenCache",
    "build_token_cache",
    "heldout_windows",
    "read_documents",
]
