"""The idx file format of the MNIST family (LeCun's `*-idx3-ubyte`, `*-idx1-ubyte`), gzipped or not.

An idx file is a 4-byte magic number (two zero bytes, a type code, the number of dimensions), one
big-endian uint32 per dimension, then the values in row-major order. The MNIST family uses type
0x08 (unsigned byte) only: images are idx3 (N, H, W), labels idx1 (N,). A file that starts with the
gzip magic (1f 8b) is decompressed on the fly, so Debian's `/usr/share/datasets/fashion-mnist/*.gz`
and torchvision's downloads read the same way.
"""

from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path

import torch
from torch import Tensor

GZIP_MAGIC = b"\x1f\x8b"
UBYTE = 0x08
# Decompressed size bound: the largest file of the family (EMNIST-digits' train images) is 188 MB,
# so a bigger one is not one of them (and a gzip bomb stops here).
MAX_BYTES = 1 << 30


class IdxError(ValueError):
    """The file is not a readable unsigned-byte idx file of the expected rank."""


def read_idx(path: Path, ndim: int) -> Tensor:
    """The values of an unsigned-byte idx file as a uint8 tensor shaped by its header.

    Args:
        path: the file, plain or gzipped (detected by its first two bytes, not its name).
        ndim: the rank the caller expects (3 for images, 1 for labels).

    Returns:
        (d1, ..., d_ndim) uint8, a fresh writable tensor.

    Raises:
        IdxError: unreadable file, corrupt gzip stream, foreign magic number, wrong type or rank,
            or a payload whose length differs from the header's sizes (truncated or padded).
    """
    gzipped = False
    try:
        with path.open("rb") as fh:
            gzipped = fh.read(2) == GZIP_MAGIC
        with (gzip.open(path, "rb") if gzipped else path.open("rb")) as fh:
            data = bytearray(fh.read(MAX_BYTES + 1))
    except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError; EOFError: cut stream
        raise IdxError(f"{'corrupt gzip' if gzipped else 'unreadable'}: {exc}") from None
    if len(data) > MAX_BYTES:
        raise IdxError(f"over {MAX_BYTES} bytes{' once decompressed' if gzipped else ''}")
    header = 4 + 4 * ndim
    if len(data) < 4 or data[:4] != bytes((0, 0, UBYTE, ndim)):
        raise IdxError(f"magic number 0x{bytes(data[:4]).hex()} is not an unsigned-byte idx{ndim} "
                       f"file's (0x0000{UBYTE:02x}{ndim:02x})")
    if len(data) < header:
        raise IdxError(f"{len(data)} bytes is shorter than an idx{ndim} header")
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    size = math.prod(dims)
    if len(data) - header != size:
        raise IdxError(f"the header says {'x'.join(map(str, dims))} = {size} values but "
                       f"{len(data) - header} bytes follow it")
    if size == 0:  # torch.frombuffer refuses an empty view
        return torch.zeros(dims, dtype=torch.uint8)
    return torch.frombuffer(data, dtype=torch.uint8, count=size, offset=header).view(dims)
