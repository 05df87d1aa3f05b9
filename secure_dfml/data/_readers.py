"""Low-level readers for the on-disk formats: idx files, image folders/tarballs, CSV.

They return raw arrays (uint8 images, string/float columns); normalisation and
subsampling happen in :mod:`secure_dfml.data._datasets`.  Every failure is a
:class:`~secure_dfml.errors.DataError` whose message names the file and the fix.
Nothing is written to disk: tarballs are read in memory.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import logging
import lzma
import os
import struct
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

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


def _read_bytes(path: Path) -> bytes:
    try:
        with open(path, "rb") as fh:
            head = fh.read(2)
            fh.seek(0)
            if head == b"\x1f\x8b":
                with gzip.GzipFile(fileobj=fh) as gz:
                    return gz.read()
            return fh.read()
    except (OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError
        raise DataError(f"cannot read {path}: {exc}. Check the file is complete and readable.") from exc


def read_idx(path: Path) -> np.ndarray:
    """Read one idx file (optionally gzip-compressed) into an array."""
    data = _read_bytes(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DataError(
            f"{path} is not an idx file (bad magic number); expected the MNIST idx format "
            "(e.g. train-images-idx3-ubyte.gz)."
        )
    dtype = _IDX_DTYPES[data[2]]
    ndim = data[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(data) < header:
        raise DataError(f"{path}: truncated idx header.")
    dims = struct.unpack(">" + "I" * ndim, data[4:header])
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(data) - header != expected:
        raise DataError(
            f"{path}: idx header announces shape {dims} ({expected} bytes of data) but the file "
            f"holds {len(data) - header} bytes; the file is truncated or corrupt - download it again."
        )
    arr = np.frombuffer(data, dtype=dtype, count=int(np.prod(dims)), offset=header).reshape(dims)
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


#: Tarballs up to this size (compressed) are decompressed in memory at once.
IN_MEMORY_TAR_LIMIT = 512 * 1024 * 1024


def _decompress(data: bytes) -> bytes:
    if data[:2] == b"\x1f\x8b":
        return gzip.decompress(data)
    if data[:3] == b"BZh":
        return bz2.decompress(data)
    if data[:6] == b"\xfd7zXZ\x00":
        return lzma.decompress(data)
    return data


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
            if size <= IN_MEMORY_TAR_LIMIT:
                # Decompressing at once and slicing the buffer is ~2x faster than
                # tarfile's own streaming decompression.
                raw = _decompress(path.read_bytes())
                view = memoryview(raw)
                with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tf:
                    for member in tf:
                        entry = _tar_image_entry(member)
                        if entry is not None:
                            blobs[member.name] = bytes(view[member.offset_data : member.offset_data + member.size])
                            entries.append(entry)
            else:
                with tarfile.open(path, mode="r:*") as tf:
                    for member in tf:
                        entry = _tar_image_entry(member)
                        fh = tf.extractfile(member) if entry is not None else None
                        if entry is not None and fh is not None:
                            blobs[member.name] = fh.read()
                            entries.append(entry)
        except (tarfile.TarError, OSError, EOFError, lzma.LZMAError, ValueError) as exc:
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
