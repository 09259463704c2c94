"""Length buckets: segments that can share a batch are grouped, so batches need no padding.

A backbone's `batch_key` says which segments can share a batch exactly (same length for CNN14
and AST; any length for VGGish, whose examples are independent). A bucket is emitted when it
holds `batch_size` segments or `batch_seconds` of audio; when more than `max_pending` segments
wait, the fullest bucket goes, so memory stays bounded on corpora of all-different lengths.
"""

from __future__ import annotations

from typing import Callable, Hashable, Optional


class Batcher:
    def __init__(self, key: Callable[[object], Hashable], samples: Callable[[object], int],
                 batch_size: int, batch_samples: Optional[int], max_pending: int):
        self.key, self.samples = key, samples
        self.batch_size = max(1, batch_size)
        self.batch_samples = batch_samples
        self.max_pending = max(self.batch_size, max_pending)
        self.buckets: dict[Hashable, list] = {}
        self.pending = 0

    def _full(self, bucket: list) -> bool:
        if len(bucket) >= self.batch_size:
            return True
        if self.batch_samples is not None:
            return sum(self.samples(s) for s in bucket) >= self.batch_samples
        return False

    def add(self, item) -> list[list]:
        key = self.key(item)
        bucket = self.buckets.setdefault(key, [])
        bucket.append(item)
        self.pending += 1
        ready = []
        if self._full(bucket):
            ready.append(self._take(key))
        while self.pending > self.max_pending:
            fullest = max(self.buckets, key=lambda k: len(self.buckets[k]))
            ready.append(self._take(fullest))
        return ready

    def flush(self) -> list[list]:
        return [self._take(k) for k in list(self.buckets)]

    def _take(self, key) -> list:
        bucket = self.buckets.pop(key)
        if len(bucket) > self.batch_size:  # batch_size was lowered (out of memory)
            self.buckets[key] = bucket[self.batch_size:]
            bucket = bucket[: self.batch_size]
        self.pending -= len(bucket)
        return bucket
