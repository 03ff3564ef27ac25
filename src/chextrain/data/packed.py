"""Strings packed in one numpy buffer: what datasets hold instead of Python lists of paths.

A DataLoader worker forked from the training process shares the dataset's memory copy-on-write.
Touching a Python string (even to read it) writes its reference count, so a list of 223,414 paths
is copied page by page into every worker over an epoch (about 30 MB each). `PackedStrings` keeps
the UTF-8 bytes of every string in one uint8 array and their offsets in an int64 array: reading
one builds a new str and writes nothing shared. This module imports nothing from the package.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np


class PackedStrings:
    """An immutable sequence of str stored as one UTF-8 buffer plus offsets (N + 1 int64).

    Args:
        strings: the strings, in order.
    """

    def __init__(self, strings: Iterable[str]) -> None:
        encoded = [s.encode("utf-8") for s in strings]
        self.offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in encoded], out=self.offsets[1:])
        self.buffer = np.frombuffer(b"".join(encoded), dtype=np.uint8).copy()

    @classmethod
    def from_arrays(cls, buffer: np.ndarray, offsets: np.ndarray) -> PackedStrings:
        """Rebuild from `buffer` (uint8) and `offsets` (int64, N + 1, starting at 0), as saved."""
        offsets = np.asarray(offsets, dtype=np.int64)
        buffer = np.asarray(buffer, dtype=np.uint8)
        if offsets.ndim != 1 or len(offsets) == 0 or offsets[0] != 0 or offsets[-1] != len(buffer):
            raise ValueError(f"offsets must run from 0 to the buffer's length {len(buffer)}")
        if np.any(np.diff(offsets) < 0):
            raise ValueError("offsets must not decrease")
        out = cls.__new__(cls)
        out.buffer, out.offsets = buffer, offsets
        return out

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> str:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} strings")
        index %= len(self)
        start, stop = self.offsets[index], self.offsets[index + 1]
        return self.buffer[start:stop].tobytes().decode("utf-8")

    def __iter__(self) -> Iterator[str]:
        data = self.buffer.tobytes()
        bounds = self.offsets.tolist()
        for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
            yield data[start:stop].decode("utf-8")

    def tolist(self) -> list[str]:
        """Every string, as a Python list."""
        return list(self)

    @property
    def nbytes(self) -> int:
        """Bytes held (buffer and offsets)."""
        return int(self.buffer.nbytes + self.offsets.nbytes)
