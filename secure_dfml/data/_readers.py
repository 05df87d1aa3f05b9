"""Low-level readers for the on-disk formats: idx files, image folders/tarballs, CSV.

They return raw arrays (uint8 images, string/float columns); normalisation and
subsampling happen in :mod:`secure_dfml.data._datasets`.  Every failure is a
:class:`~secure_dfml.errors.DataError` whose message names the file and the fix.
Nothing is written to disk: tarballs are read in memory.

Sizes announced by files are untrusted: idx header sizes are computed with
Python integers (no overflow) and refused above :data:`MAX_IDX_BYTES` before
anything is allocated; compressed files (gzip idx files, compressed tarballs)
are decompressed as a stream, in chunks, and refused as soon as the
decompressed data exceed :data:`MAX_DECOMPRESSED_BYTES` (decompression bombs).
"""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import logging
import lzma
import math
import os
import struct
import tarfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from secure_dfml.errors import DataError

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------
# idx (MNIST / Fashion-MNIST format)

IDX_ROLES: tuple[str, ...] = ("train-images", "train-labels", "test-images", "test-labels")
_IDX_STEMS: dict[str, tuple[str, ...]] = {
    "train-images": ("train-images-idx3-ubyte", "train-images.idx3-ubyte"),
    "train-labels": ("train-labels-idx1-ubyte", "train-labels.idx1-ubyte"),
    "test-images": ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"),
    "test-labels": ("t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"),
}
IDX_EXPECTED = (
    "train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], "
    "t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz]"
)
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def find_idx_files(folder: Path) -> tuple[dict[str, Path], list[str]]:
    """Map each idx role to its file in ``folder``; also return the roles not found."""
    found: dict[str, Path] = {}
    missing: list[str] = []
    if not folder.is_dir():
        return found, list(IDX_ROLES)
    for role in IDX_ROLES:
        for stem in _IDX_STEMS[role]:
            for suffix in (".gz", ""):
                candidate = folder / (stem + suffix)
                if candidate.is_file():
                    found[role] = candidate
                    break
            if role in found:
                break
        else:
            missing.append(_IDX_STEMS[role][0] + "[.gz]")
    return found, missing


#: Largest data part (bytes) an idx header may announce; a gzip idx file is
#: decompressed no further than its header's size (+1 byte to detect extra data).
#: For scale: 60,000 28x28 training images (MNIST, Fashion-MNIST) are 47 MB.
MAX_IDX_BYTES = 2 * 1024**3
#: Largest decompressed size (bytes) of a tarball; CIFAR-10 as JPEG is ~0.2 GB.
MAX_DECOMPRESSED_BYTES = 4 * 1024**3
_CHUNK = 1 << 20


def _too_big(path: Path, what: str, limit: int, constant: str) -> DataError:
    return DataError(
        f"{path}: {what} exceeds the limit of {limit:,} bytes (secure_dfml.data._readers.{constant}). "
        "The file is corrupt or not what it claims to be (a decompression bomb is refused too); "
        "check or re-download it, or split the data set."
    )


def _read_exactly(fh: BinaryIO, n: int) -> bytes:
    """Up to ``n`` bytes of ``fh`` (fewer at end of file), read in chunks, so a
    stream is never decompressed further than asked."""
    parts: list[bytes] = []
    left = n
    while left > 0:
        chunk = fh.read(min(_CHUNK, left))
        if not chunk:
            break
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


def read_idx(path: Path) -> np.ndarray:
    """Read one idx file (optionally gzip-compressed) into an array.

    The header is read first; its size is computed with Python integers and
    refused above :data:`MAX_IDX_BYTES`, then exactly that many bytes are read
    (decompressed as a stream), so a corrupt header or a gzip bomb costs no
    more than the limit."""
    try:
        with open(path, "rb") as raw:
            gz = raw.read(2) == b"\x1f\x8b"
            raw.seek(0)
            fh: BinaryIO = gzip.GzipFile(fileobj=raw) if gz else raw  # type: ignore[assignment]
            with fh:
                return _read_idx_stream(fh, path)
    except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        raise DataError(f"cannot read {path}: {exc}. Check the file is complete and readable.") from exc


def _read_idx_stream(fh: BinaryIO, path: Path) -> np.ndarray:
    magic = fh.read(4)
    if len(magic) < 4 or magic[0] != 0 or magic[1] != 0 or magic[2] not in _IDX_DTYPES:
        raise DataError(
            f"{path} is not an idx file (bad magic number); expected the MNIST idx format "
            "(e.g. train-images-idx3-ubyte.gz)."
        )
    dtype = _IDX_DTYPES[magic[2]]
    ndim = magic[3]
    dims_raw = fh.read(4 * ndim)
    if ndim == 0 or len(dims_raw) < 4 * ndim:
        raise DataError(f"{path}: truncated idx header.")
    dims = struct.unpack(">" + "I" * ndim, dims_raw)
    count = math.prod(dims)  # Python ints: no overflow, never negative
    expected = count * dtype.itemsize
    if expected > MAX_IDX_BYTES:
        raise _too_big(
            path, f"the idx header announces shape {dims} ({expected:,} bytes of data), which", MAX_IDX_BYTES,
            "MAX_IDX_BYTES",
        )
    data = _read_exactly(fh, expected)
    extra = fh.read(1)
    if len(data) != expected or extra:
        holds = f"{len(data):,} bytes" if not extra else f"more than {expected:,} bytes"
        raise DataError(
            f"{path}: idx header announces shape {dims} ({expected:,} bytes of data) but the file "
            f"holds {holds}; the file is truncated or corrupt - download it again."
        )
    arr = np.frombuffer(data, dtype=dtype, count=count).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=False)


def read_idx_folder(folder: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return ``(x_train, y_train, x_test, y_test)`` from an idx folder (images as stored)."""
    files, missing = find_idx_files(folder)
    if missing:
        raise DataError(f"{folder} lacks the idx file(s) {', '.join(missing)}; expected {IDX_EXPECTED}.")
    arrays = {role: read_idx(path) for role, path in files.items()}
    out = []
    for split in ("train", "test"):
        x, y = arrays[f"{split}-images"], arrays[f"{split}-labels"]
        if y.ndim != 1 or x.ndim not in (3, 4) or x.shape[0] != y.shape[0]:
            raise DataError(
                f"{folder}: {split} images have shape {x.shape} and labels {y.shape}; expected "
                "(n, H, W) images and (n,) labels with the same n."
            )
        out.extend([x, y])
    return out[0], out[1], out[2], out[3]


# ---------------------------------------------------------------------------
# Image folders: train/<class>/*.png|jpg, test/<class>/* (directory or tarball)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
TAR_SUFFIXES: tuple[str, ...] = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
SPLITS = ("train", "test")
_GREY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F", "La"})


def is_tarball(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(TAR_SUFFIXES)


def find_image_root(folder: Path) -> Path | None:
    """The folder holding ``train/`` and ``test/``: ``folder`` itself or its only subfolder."""
    if not folder.is_dir():
        return None
    if (folder / "train").is_dir() and (folder / "test").is_dir():
        return folder
    subdirs = [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")]
    if len(subdirs) == 1 and (subdirs[0] / "train").is_dir() and (subdirs[0] / "test").is_dir():
        return subdirs[0]
    return None


#: Tarballs up to this size (compressed) are decompressed into memory in one
#: streaming pass (capped at :data:`MAX_DECOMPRESSED_BYTES`), then sliced.
IN_MEMORY_TAR_LIMIT = 512 * 1024 * 1024


def _decompressing_reader(fh: BinaryIO) -> BinaryIO:
    """``fh`` itself, or a streaming decompressor over it (gzip, bzip2, xz by magic bytes)."""
    head = fh.read(6)
    fh.seek(0)
    if head[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=fh)  # type: ignore[return-value]
    if head[:3] == b"BZh":
        return bz2.BZ2File(fh)  # type: ignore[return-value]
    if head[:6] == b"\xfd7zXZ\x00":
        return lzma.LZMAFile(fh)  # type: ignore[return-value]
    return fh


def _decompress_file(path: Path, limit: int) -> io.BytesIO:
    """The decompressed bytes of ``path``, decompressed chunk by chunk and refused
    as soon as they exceed ``limit`` bytes."""
    out = io.BytesIO()
    with open(path, "rb") as raw:
        reader = _decompressing_reader(raw)
        total = 0
        while chunk := reader.read(_CHUNK):
            total += len(chunk)
            if total > limit:
                raise _too_big(path, "the decompressed tarball", limit, "MAX_DECOMPRESSED_BYTES")
            out.write(chunk)
    out.seek(0)
    return out


@dataclass(frozen=True)
class ImageEntry:
    split: str
    label_name: str
    name: str


def _is_image_name(name: str) -> bool:
    dot = name.rfind(".")
    return not name.startswith(".") and dot > 0 and name[dot:].lower() in IMAGE_SUFFIXES


def _tar_image_entry(member: tarfile.TarInfo) -> ImageEntry | None:
    """``train|test/<class>/<file>`` members (at any depth) that look like images."""
    if not member.isfile():
        return None
    parts = [p for p in member.name.split("/") if p not in ("", ".")]
    if len(parts) < 3 or parts[-3] not in SPLITS or not _is_image_name(parts[-1]):
        return None
    return ImageEntry(parts[-3], parts[-2], member.name)


class ImageCollection:
    """Image files listed by (split, class, name); bytes read on demand (directories)
    or held in memory (tarballs, which are read in one streaming pass)."""

    def __init__(self, source: Path, entries: list[ImageEntry], blobs: dict[str, bytes] | None) -> None:
        self.source = source
        self.entries = entries
        self._blobs = blobs

    @classmethod
    def from_directory(cls, root: Path) -> ImageCollection:
        entries: list[ImageEntry] = []
        try:
            for split in SPLITS:
                split_dir = root / split
                for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
                    with os.scandir(class_dir) as it:
                        names = sorted(e.name for e in it if e.is_file() and _is_image_name(e.name))
                    entries.extend(ImageEntry(split, class_dir.name, str(class_dir / n)) for n in names)
        except OSError as exc:
            raise DataError(f"cannot read image folder {root}: {exc}.") from exc
        return cls(root, entries, None)

    @classmethod
    def from_tarball(cls, path: Path) -> ImageCollection:
        """Read every image of a tarball (any compression) in one pass, in memory."""
        entries: list[ImageEntry] = []
        blobs: dict[str, bytes] = {}
        try:
            size = path.stat().st_size
            limit = MAX_DECOMPRESSED_BYTES
            if size <= IN_MEMORY_TAR_LIMIT:
                # Decompressing in one pass and slicing the buffer is ~2x faster than
                # tarfile's own member-by-member decompression.
                buf = _decompress_file(path, limit)
                view = buf.getbuffer()
                try:
                    with tarfile.open(fileobj=buf, mode="r:") as tf:
                        for member in tf:
                            entry = _tar_image_entry(member)
                            if entry is not None:
                                blobs[member.name] = bytes(view[member.offset_data : member.offset_data + member.size])
                                entries.append(entry)
                finally:
                    view.release()
            else:
                with tarfile.open(path, mode="r:*") as tf:
                    for member in tf:
                        # offset_data + size: how far into the decompressed stream this member reaches
                        if member.offset_data + member.size > limit:
                            raise _too_big(path, f"the decompressed tarball (at member {member.name!r})", limit,
                                           "MAX_DECOMPRESSED_BYTES")
                        entry = _tar_image_entry(member)
                        fh = tf.extractfile(member) if entry is not None else None
                        if entry is not None and fh is not None:
                            blobs[member.name] = fh.read()
                            entries.append(entry)
        except DataError:
            raise
        except (tarfile.TarError, OSError, EOFError, lzma.LZMAError, zlib.error, ValueError) as exc:
            raise DataError(
                f"cannot read tarball {path}: {exc}. Check that the file is a complete tar archive."
            ) from exc
        entries.sort(key=lambda e: (e.split, e.label_name, e.name))
        return cls(path, entries, blobs)

    def read(self, entry: ImageEntry) -> bytes:
        if self._blobs is not None:
            return self._blobs[entry.name]
        try:
            return Path(entry.name).read_bytes()
        except OSError as exc:
            raise DataError(f"cannot read image {entry.name}: {exc}.") from exc


def decode_images(collection: ImageCollection, entries: Sequence[ImageEntry]) -> np.ndarray:
    """Decode images into a uint8 array ``(n, C, H, W)`` (C = 1 if all are greyscale, else 3)."""
    from PIL import Image, UnidentifiedImageError  # Pillow ships with matplotlib

    arrays: list[np.ndarray] = []
    first_shape: tuple[int, int] | None = None
    first_name = ""
    colour = False
    for i, entry in enumerate(entries):
        blob = collection.read(entry)
        try:
            with Image.open(io.BytesIO(blob)) as im:
                if im.mode in ("L", "RGB"):
                    arr = np.asarray(im)
                else:
                    arr = np.asarray(im.convert("L" if im.mode in _GREY_MODES else "RGB"))
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
            raise DataError(
                f"cannot decode image {entry.name} in {collection.source}: {exc}. "
                "Remove or re-encode the file (PNG or JPEG)."
            ) from exc
        if first_shape is None:
            first_shape, first_name = arr.shape[:2], entry.name
        elif arr.shape[:2] != first_shape:
            h0, w0 = first_shape
            h, w = arr.shape[:2]
            raise DataError(
                f"images in {collection.source} differ in size: {first_name} is {w0}x{h0} but "
                f"{entry.name} is {w}x{h}. All images must have the same size; resize them first."
            )
        colour = colour or arr.ndim == 3
        arrays.append(arr)
        if (i + 1) % 20000 == 0:
            log.info("decoded %d/%d images from %s", i + 1, len(entries), collection.source)
    if not arrays:
        raise DataError(f"no images to decode in {collection.source}.")
    if colour:
        arrays = [a if a.ndim == 3 else np.repeat(a[:, :, None], 3, axis=2) for a in arrays]
        return np.ascontiguousarray(np.stack(arrays).transpose(0, 3, 1, 2))
    return np.stack(arrays)[:, None, :, :]


# ---------------------------------------------------------------------------
# CSV

CSV_SUFFIXES: tuple[str, ...] = (".csv", ".tsv", ".txt")
_DELIMITER_CANDIDATES = (",", ";", "\t", "|")


@dataclass(frozen=True)
class CsvTable:
    path: Path
    header: tuple[str, ...]
    columns: dict[str, list[str]]

    @property
    def num_rows(self) -> int:
        return len(next(iter(self.columns.values()))) if self.columns else 0

    def numeric(self, name: str) -> np.ndarray:
        """A column as float64; a clear error for text or missing values."""
        values = self.columns[name]
        try:
            arr = np.array(values, dtype=np.float64)
        except ValueError:
            for row, v in enumerate(values, start=2):
                try:
                    float(v)
                except ValueError:
                    what = "an empty (missing) value" if not v.strip() else f"the non-numeric value {v!r}"
                    raise DataError(
                        f"{self.path}: column {name!r} has {what} at line {row}; feature columns must be "
                        "numeric. Encode it as numbers, fill missing values, or drop the column."
                    ) from None
            raise  # pragma: no cover
        bad = np.flatnonzero(~np.isfinite(arr))
        if bad.size:
            raise DataError(
                f"{self.path}: column {name!r} has a missing/non-finite value at line {int(bad[0]) + 2}; "
                "fill or drop those rows."
            )
        return arr


def _normalise_delimiter(delimiter: str) -> str:
    aliases = {"\\t": "\t", "tab": "\t", "TAB": "\t"}
    delimiter = aliases.get(delimiter, delimiter)
    if len(delimiter) != 1:
        raise DataError(f"data.csv_delimiter = {delimiter!r} must be a single character (or 'tab').")
    return delimiter


def _sniff_delimiter(path: Path, first_line: str) -> str:
    counts = {d: first_line.count(d) for d in _DELIMITER_CANDIDATES}
    best = max(counts, key=lambda d: counts[d])
    if counts[best] == 0:
        raise DataError(
            f"cannot detect the delimiter of {path}: the header line {first_line.strip()[:80]!r} contains none of "
            "',', ';', tab or '|'. Set data.csv_delimiter."
        )
    return best


def read_csv(path: Path, delimiter: str | None = None) -> CsvTable:
    """Read a CSV with a header row into string columns."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:
            first_line = fh.readline()
            if not first_line.strip():
                raise DataError(f"{path} is empty or has no header row; the first line must name the columns.")
            delim = _normalise_delimiter(delimiter) if delimiter else _sniff_delimiter(path, first_line)
            fh.seek(0)
            reader = csv.reader(fh, delimiter=delim)
            header = tuple(h.strip() for h in next(reader))
            rows = []
            for row in reader:
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue
                if len(row) != len(header):
                    raise DataError(
                        f"{path}: line {reader.line_num} has {len(row)} fields but the header has {len(header)} "
                        f"(delimiter {delim!r}); fix the row or set data.csv_delimiter."
                    )
                rows.append(row)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text ({exc}); is it really a CSV file?") from exc
    except csv.Error as exc:
        raise DataError(f"{path}: malformed CSV ({exc}).") from exc
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc}.") from exc
    if len(set(header)) != len(header) or any(not h for h in header):
        raise DataError(f"{path}: the header must name every column exactly once, got {list(header)}.")
    columns = {h: list(col) for h, col in zip(header, zip(*rows))} if rows else {h: [] for h in header}
    return CsvTable(path, header, columns)
