"""Data set loaders: bundled sets, user paths (idx, image folder, CSV), look-up order, errors."""

from __future__ import annotations

import gzip
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest

from secure_dfml.config import DataConfig
from secure_dfml.data import ArrayDataset, available_datasets, load_dataset
from secure_dfml.data import _locate
from secure_dfml.errors import ConfigError, DataError

Image = pytest.importorskip("PIL.Image")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_shared_data = pytest.mark.skipif(
    not SHARED_DATA.is_dir(), reason=f"shared data folder {SHARED_DATA} is absent (see DESIGN.md section 8)"
)


def _check_dataset(ds: ArrayDataset) -> None:
    for x, y in ((ds.x_train, ds.y_train), (ds.x_test, ds.y_test)):
        assert x.dtype == np.float32 and y.dtype == np.int64
        assert x.shape == (len(y), *ds.input_shape)
        assert y.min() >= 0 and y.max() < ds.num_classes
        assert np.isfinite(x).all()
    assert len(ds.class_names) == ds.num_classes


@pytest.fixture(scope="module")
def digits() -> ArrayDataset:
    return load_dataset(DataConfig(name="digits"))


# ---------------------------------------------------------------------------
# bundled data sets


def test_available_datasets():
    assert available_datasets() == sorted(["breast-cancer", "cardio", "cifar10", "digits", "fashion-mnist", "fashion-mnist-mini"])


def test_digits_shapes_and_normalisation(digits):
    _check_dataset(digits)
    assert digits.kind == "image" and digits.input_shape == (1, 8, 8) and digits.num_classes == 10
    assert len(digits.y_train) + len(digits.y_test) == 1797
    assert len(digits.y_test) == 449  # ~25 % carved out
    assert np.bincount(digits.y_test, minlength=10).min() >= 43  # stratified
    assert abs(float(digits.x_train.mean())) < 0.05 and abs(float(digits.x_train.std()) - 1) < 0.05
    assert digits.x_train.min() == pytest.approx((0 - 0.30526) / 0.37605, rel=1e-4)


def test_digits_test_carve_out_is_fixed(digits):
    other = load_dataset(DataConfig(name="digits"), rng=np.random.default_rng(123))
    assert np.array_equal(other.x_test, digits.x_test) and np.array_equal(other.y_test, digits.y_test)


def test_max_samples_stratified_and_deterministic(digits):
    cfg = DataConfig(name="digits", max_train_samples=100, max_test_samples=50)
    a = load_dataset(cfg, rng=np.random.default_rng(7))
    b = load_dataset(cfg, rng=np.random.default_rng(7))
    c = load_dataset(cfg, rng=np.random.default_rng(8))
    assert len(a.y_train) == 100 and len(a.y_test) == 50
    assert np.array_equal(np.bincount(a.y_train, minlength=10), np.full(10, 10))
    assert np.array_equal(a.x_train, b.x_train) and np.array_equal(a.y_test, b.y_test)
    assert not np.array_equal(a.x_train, c.x_train)
    assert set(map(bytes, a.x_test)) <= set(map(bytes, digits.x_test))  # drawn from the global test set


def test_breast_cancer():
    ds = load_dataset(DataConfig(name="breast-cancer"))
    _check_dataset(ds)
    assert ds.kind == "tabular" and ds.input_shape == (30,) and ds.num_classes == 2
    assert ds.class_names == ("malignant", "benign")
    assert len(ds.y_train) + len(ds.y_test) == 569 and len(ds.y_test) == 142
    both = np.concatenate([ds.x_train, ds.x_test])
    np.testing.assert_allclose(both.mean(axis=0), 0, atol=1e-3)
    np.testing.assert_allclose(both.std(axis=0), 1, atol=1e-3)


def test_unknown_name_without_path():
    with pytest.raises(DataError, match=r"(?s)'mnist'.*digits.*data\.path"):
        load_dataset(DataConfig(name="mnist"))


def test_builtin_format_mismatch():
    with pytest.raises(ConfigError, match="data.format"):
        load_dataset(DataConfig(name="fashion-mnist", format="csv"))


def test_rng_must_be_a_generator():
    with pytest.raises(TypeError, match="Generator"):
        load_dataset(DataConfig(name="digits"), rng=np.random.RandomState(0))  # type: ignore[arg-type]


# ---------------------------------------------------------------------------
# tiny on-disk fixtures


def _idx_bytes(arr: np.ndarray) -> bytes:
    code = {np.dtype(np.uint8): 0x08}[arr.dtype]
    return bytes([0, 0, code, arr.ndim]) + struct.pack(">" + "I" * arr.ndim, *arr.shape) + arr.tobytes()


def _write_idx_folder(folder: Path, *, n_train=40, n_test=12, classes=3, hw=(6, 5), gz=True) -> tuple:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    x_tr = rng.integers(0, 256, size=(n_train, *hw), dtype=np.uint8)
    x_te = rng.integers(0, 256, size=(n_test, *hw), dtype=np.uint8)
    y_tr = (np.arange(n_train) % classes).astype(np.uint8)
    y_te = (np.arange(n_test) % classes).astype(np.uint8)
    names = {
        "train-images-idx3-ubyte": x_tr,
        "train-labels-idx1-ubyte": y_tr,
        "t10k-images-idx3-ubyte": x_te,
        "t10k-labels-idx1-ubyte": y_te,
    }
    for name, arr in names.items():
        data = _idx_bytes(arr)
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)
    return x_tr, y_tr, x_te, y_te


def _write_image_folder(root: Path, *, classes=("cat", "dog"), per_class=(6, 2), size=(5, 4), mode="RGB", fmt="PNG"):
    rng = np.random.default_rng(0)
    channels = 3 if mode == "RGB" else None
    for split, count in zip(("train", "test"), per_class):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                shape = (size[1], size[0], channels) if channels else (size[1], size[0])
                arr = rng.integers(0, 256, size=shape, dtype=np.uint8)
                Image.fromarray(arr, mode=mode).save(d / f"{i:03d}.{fmt.lower()}", format=fmt)
    (root / "train" / classes[0] / "notes.txt").write_text("not an image, ignored")


def _write_csv(path: Path, n=60, delimiter=",", label="diagnosis", label_values=("no", "yes"), extra_text=False):
    rng = np.random.default_rng(0)
    header = ["age", "weight", label] + (["city"] if extra_text else [])
    lines = [delimiter.join(header)]
    for i in range(n):
        row = [f"{rng.normal(50, 10):.3f}", f"{rng.normal(70, 5):.3f}", label_values[i % len(label_values)]]
        if extra_text:
            row.append("Paris")
        lines.append(delimiter.join(row))
    path.write_text("\n".join(lines) + "\n")
    return path


# ---------------------------------------------------------------------------
# user idx folders


@pytest.mark.parametrize("gz", [True, False])
def test_user_idx_folder(tmp_path, gz):
    x_tr, y_tr, x_te, y_te = _write_idx_folder(tmp_path / "mine", gz=gz)
    ds = load_dataset(DataConfig(name="my-idx", path=str(tmp_path / "mine")))
    _check_dataset(ds)
    assert ds.name == "my-idx" and ds.kind == "image" and ds.input_shape == (1, 6, 5)
    assert ds.class_names == ("0", "1", "2")
    np.testing.assert_allclose(ds.x_train[:, 0], (x_tr / 255.0 - 0.5) / 0.5, atol=1e-6)
    assert np.array_equal(ds.y_test, y_te)


def test_user_idx_truncated_file(tmp_path):
    _write_idx_folder(tmp_path, gz=False)
    f = tmp_path / "train-images-idx3-ubyte"
    f.write_bytes(f.read_bytes()[:-7])
    with pytest.raises(DataError, match="truncated"):
        load_dataset(DataConfig(name="x", path=str(tmp_path), format="idx"))


def test_user_idx_missing_file_named(tmp_path):
    _write_idx_folder(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte"):
        load_dataset(DataConfig(name="x", path=str(tmp_path), format="idx"))


# ---------------------------------------------------------------------------
# user image folders and tarballs


def test_user_image_folder(tmp_path):
    _write_image_folder(tmp_path / "imgs")
    ds = load_dataset(DataConfig(name="pets", path=str(tmp_path / "imgs")))
    _check_dataset(ds)
    assert ds.input_shape == (3, 4, 5) and ds.class_names == ("cat", "dog")
    assert len(ds.y_train) == 12 and len(ds.y_test) == 4
    assert ds.x_train.min() >= -1.0 and ds.x_train.max() <= 1.0


def test_user_image_folder_greyscale_and_subsample(tmp_path):
    _write_image_folder(tmp_path, classes=("a", "b", "c"), per_class=(10, 4), mode="L")
    cfg = DataConfig(name="grey", path=str(tmp_path), format="image-folder", max_train_samples=12)
    ds = load_dataset(cfg, rng=np.random.default_rng(0))
    assert ds.input_shape == (1, 4, 5)
    assert np.array_equal(np.bincount(ds.y_train), [4, 4, 4])


def test_user_image_tarball_matches_folder(tmp_path):
    _write_image_folder(tmp_path / "imgs" / "data")
    tar_path = tmp_path / "imgs.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tf:
        tf.add(tmp_path / "imgs" / "data", arcname="data")
    from_dir = load_dataset(DataConfig(name="p", path=str(tmp_path / "imgs")))  # single subfolder holding train/test
    from_tar = load_dataset(DataConfig(name="p", path=str(tar_path)))
    assert np.array_equal(from_dir.x_train, from_tar.x_train) and np.array_equal(from_dir.y_test, from_tar.y_test)


def test_user_image_sizes_must_match(tmp_path):
    _write_image_folder(tmp_path)
    Image.fromarray(np.zeros((9, 9, 3), np.uint8)).save(tmp_path / "test" / "dog" / "big.png")
    with pytest.raises(DataError, match="same size"):
        load_dataset(DataConfig(name="p", path=str(tmp_path)))


def test_user_image_undecodable(tmp_path):
    _write_image_folder(tmp_path)
    (tmp_path / "train" / "cat" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="broken.png"):
        load_dataset(DataConfig(name="p", path=str(tmp_path)))


# ---------------------------------------------------------------------------
# user CSVs


@pytest.mark.parametrize("delimiter", [",", ";", "\t"])
def test_user_csv_sniffed_delimiter_and_labels(tmp_path, delimiter):
    path = _write_csv(tmp_path / "patients.csv", delimiter=delimiter)
    ds = load_dataset(DataConfig(name="clinic", path=str(path), label_column="diagnosis"))
    _check_dataset(ds)
    assert ds.kind == "tabular" and ds.input_shape == (2,) and ds.class_names == ("no", "yes")
    assert len(ds.y_test) == 12 and len(ds.y_train) == 48
    assert np.array_equal(np.bincount(ds.y_test), [6, 6])  # stratified carve-out
    # standardised with the (public) global test split
    np.testing.assert_allclose(ds.x_test.mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(ds.x_test.std(axis=0), 1, atol=1e-5)


def test_user_csv_carve_out_is_deterministic(tmp_path):
    path = _write_csv(tmp_path / "d.csv", label_values=("0", "1", "2"))
    cfg = DataConfig(name="c", path=str(path), label_column="diagnosis")
    a = load_dataset(cfg, rng=np.random.default_rng(1))
    b = load_dataset(cfg, rng=np.random.default_rng(2))
    assert np.array_equal(a.x_test, b.x_test) and a.class_names == ("0", "1", "2")


def test_user_csv_train_and_test_files(tmp_path):
    _write_csv(tmp_path / "train.csv", n=30)
    _write_csv(tmp_path / "test.csv", n=10)
    ds = load_dataset(DataConfig(name="c", path=str(tmp_path), label_column="diagnosis"))
    assert len(ds.y_train) == 30 and len(ds.y_test) == 10


def test_user_csv_missing_label_column_lists_columns(tmp_path):
    path = _write_csv(tmp_path / "d.csv")
    with pytest.raises(DataError, match=r"'outcome' not found.*\['age', 'weight', 'diagnosis'\]"):
        load_dataset(DataConfig(name="c", path=str(path), label_column="outcome"))


def test_user_csv_needs_label_column(tmp_path):
    path = _write_csv(tmp_path / "d.csv")
    with pytest.raises(ConfigError, match=r"data.label_column.*'age'"):
        load_dataset(DataConfig(name="c", path=str(path)))


def test_user_csv_non_numeric_feature(tmp_path):
    path = _write_csv(tmp_path / "d.csv", extra_text=True)
    with pytest.raises(DataError, match=r"column 'city'.*'Paris'.*line 2"):
        load_dataset(DataConfig(name="c", path=str(path), label_column="diagnosis"))


def test_user_csv_ragged_row(tmp_path):
    path = _write_csv(tmp_path / "d.csv")
    path.write_text(path.read_text() + "1,2\n")
    with pytest.raises(DataError, match="line 62 has 2 fields"):
        load_dataset(DataConfig(name="c", path=str(path), label_column="diagnosis"))


def test_user_csv_too_few_rows(tmp_path):
    path = _write_csv(tmp_path / "d.csv", n=6)
    with pytest.raises(DataError, match="only 6 rows"):
        load_dataset(DataConfig(name="c", path=str(path), label_column="diagnosis"))


def test_user_csv_single_class(tmp_path):
    path = _write_csv(tmp_path / "d.csv", label_values=("yes",))
    with pytest.raises(DataError, match="single value"):
        load_dataset(DataConfig(name="c", path=str(path), label_column="diagnosis"))


# ---------------------------------------------------------------------------
# path and format errors


def test_missing_path(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(DataConfig(name="mine", path=str(tmp_path / "nope")))


@pytest.mark.parametrize(
    ("fmt", "make", "match"),
    [
        ("idx", "csv", "lacks|needs a folder"),
        ("csv", "images", "0 CSV files"),
        ("image-folder", "csv", "no train/ and test/"),
        ("image-folder", "idx", "no train/ and test/"),
        ("auto", "junk", "cannot detect"),
    ],
)
def test_wrong_format(tmp_path, fmt, make, match):
    root = tmp_path / "d"
    root.mkdir()
    if make == "csv":
        _write_csv(root / "d.csv")
    elif make == "images":
        _write_image_folder(root)
    elif make == "idx":
        _write_idx_folder(root)
    else:
        (root / "readme.md").write_text("hello")
    with pytest.raises(DataError, match=match):
        load_dataset(DataConfig(name="mine", path=str(root), format=fmt, label_column="diagnosis"))


def test_csv_file_given_as_idx(tmp_path):
    path = _write_csv(tmp_path / "d.csv")
    with pytest.raises(DataError, match="needs a folder"):
        load_dataset(DataConfig(name="mine", path=str(path), format="idx"))


def test_unknown_file_type(tmp_path):
    path = tmp_path / "data.bin"
    path.write_bytes(b"\x00\x01")
    with pytest.raises(DataError, match="cannot tell the format"):
        load_dataset(DataConfig(name="mine", path=str(path)))


# ---------------------------------------------------------------------------
# where built-in data sets are looked for


@pytest.fixture
def no_default_locations(tmp_path, monkeypatch):
    """Hide shared/data beside the checkout, the environment variable and system folders.

    The checkout is moved to tmp/work/repo (so shared data beside it is
    tmp/work/shared/data) and the current directory to tmp/elsewhere/cwd."""
    work = tmp_path / "elsewhere" / "cwd"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    monkeypatch.delenv(_locate.ENV_VAR, raising=False)
    monkeypatch.setattr(_locate, "REPO_ROOT", tmp_path / "work" / "repo")
    monkeypatch.setattr(_locate, "SYSTEM_DIRS", {})
    return tmp_path


def test_builtin_missing_everywhere(no_default_locations):
    with pytest.raises(DataError, match=r"(?s)fashion-mnist.*Looked in.*apt-get install dataset-fashion-mnist"):
        load_dataset(DataConfig(name="fashion-mnist"))
    with pytest.raises(DataError, match=r"(?s)cifar10.*cifar10-jpg.tar.gz"):
        load_dataset(DataConfig(name="cifar10"))
    with pytest.raises(DataError, match=r"(?s)cardio.*cardio_train.csv"):
        load_dataset(DataConfig(name="cardio"))


def test_builtin_cfg_path_without_files(no_default_locations):
    with pytest.raises(DataError, match="does not contain"):
        load_dataset(DataConfig(name="fashion-mnist", path=str(no_default_locations)))


def test_fashion_mnist_from_cfg_path_uses_fixed_constants(no_default_locations):
    x_tr, _, _, _ = _write_idx_folder(no_default_locations / "fm", classes=10, hw=(28, 28))
    ds = load_dataset(DataConfig(name="fashion-mnist", path=str(no_default_locations / "fm")))
    assert ds.name == "fashion-mnist" and ds.input_shape == (1, 28, 28) and ds.class_names[0] == "T-shirt/top"
    np.testing.assert_allclose(ds.x_train[:, 0], (x_tr / 255.0 - 0.2860) / 0.3530, atol=1e-5)


def test_env_var_folder(no_default_locations, monkeypatch):
    _write_idx_folder(no_default_locations / "datasets" / "fashion-mnist", classes=10, hw=(28, 28))
    monkeypatch.setenv(_locate.ENV_VAR, str(no_default_locations / "datasets"))
    assert load_dataset(DataConfig(name="fashion-mnist")).input_shape == (1, 28, 28)


def test_shared_data_beside_the_checkout(no_default_locations):
    _write_idx_folder(no_default_locations / "work" / "shared" / "data" / "fashion-mnist", classes=10, hw=(28, 28))
    assert len(load_dataset(DataConfig(name="fashion-mnist")).y_train) == 40


def test_shared_data_is_not_looked_for_from_the_current_directory(no_default_locations):
    # ../shared/data from the current directory is wherever the user happens to be: never looked at
    _write_idx_folder(no_default_locations / "elsewhere" / "shared" / "data" / "fashion-mnist", classes=10, hw=(28, 28))
    with pytest.raises(DataError, match="Looked in") as info:
        load_dataset(DataConfig(name="fashion-mnist"))
    assert str(no_default_locations / "work" / "shared" / "data" / "fashion-mnist") in str(info.value)
    assert "elsewhere" not in str(info.value) and "current directory" not in str(info.value)


def test_shared_data_location_does_not_depend_on_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.delenv(_locate.ENV_VAR, raising=False)
    before = _locate.search_locations("fashion-mnist")
    monkeypatch.chdir(tmp_path)
    assert _locate.search_locations("fashion-mnist") == before
    assert (_locate.SHARED_DATA_ORIGIN, _locate.REPO_ROOT.parent / "shared" / "data" / "fashion-mnist") in before
    assert _locate.REPO_ROOT == Path(_locate.__file__).resolve().parent.parent.parent


def test_cifar10_tiny_tarball(no_default_locations):
    root = no_default_locations / "c10"
    classes = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
    _write_image_folder(root, classes=classes, per_class=(2, 1), size=(32, 32), fmt="JPEG")
    tar_path = no_default_locations / "cifar10-jpg.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tf:
        for split in ("train", "test"):
            tf.add(root / split, arcname=split)
    ds = load_dataset(DataConfig(name="cifar10", path=str(tar_path)))
    _check_dataset(ds)
    assert ds.input_shape == (3, 32, 32) and ds.class_names == classes and len(ds.y_train) == 20


def test_cifar10_wrong_classes(no_default_locations):
    _write_image_folder(no_default_locations / "c10", size=(32, 32))
    with pytest.raises(DataError, match="expected the classes"):
        load_dataset(DataConfig(name="cifar10", path=str(no_default_locations / "c10")))


def test_cardio_from_small_file(no_default_locations):
    rng = np.random.default_rng(0)
    header = "id;age;gender;height;weight;sbp;dbp;cholesterol;gluc;smoke;alco;active;cardio"
    rows = [
        f"{i};{rng.integers(14000, 23000)};{1 + i % 2};{rng.integers(150, 190)};{rng.normal(75, 10):.1f};"
        f"{rng.integers(100, 160)};{rng.integers(60, 100)};1;1;0;0;1;{i % 2}"
        for i in range(70)
    ]
    (no_default_locations / "cardio_train.csv").write_text("\n".join([header, *rows]) + "\n")
    ds = load_dataset(DataConfig(name="cardio", path=str(no_default_locations)))
    _check_dataset(ds)
    assert ds.input_shape == (11,) and len(ds.y_test) == 10 and len(ds.y_train) == 60


def test_cardio_wrong_columns(no_default_locations):
    (no_default_locations / "cardio_train.csv").write_text("a;b\n1;2\n")
    with pytest.raises(DataError, match=r"columns present: \['a', 'b'\]"):
        load_dataset(DataConfig(name="cardio", path=str(no_default_locations)))


# ---------------------------------------------------------------------------
# the real files (slow)


@pytest.mark.slow
@needs_shared_data
def test_real_fashion_mnist_subsample():
    cfg = DataConfig(name="fashion-mnist", path=str(SHARED_DATA / "fashion-mnist"), max_train_samples=2000)
    ds = load_dataset(cfg, rng=np.random.default_rng(0))
    _check_dataset(ds)
    assert ds.input_shape == (1, 28, 28) and len(ds.y_train) == 2000 and len(ds.y_test) == 10000
    assert np.array_equal(np.bincount(ds.y_train), np.full(10, 200))
    assert abs(float(ds.x_test.mean())) < 0.05 and abs(float(ds.x_test.std()) - 1) < 0.05


@pytest.mark.slow
@needs_shared_data
def test_real_cifar10_from_tarball():
    cfg = DataConfig(name="cifar10", path=str(SHARED_DATA / "cifar10" / "cifar10-jpg.tar.gz"),
                     max_train_samples=500, max_test_samples=200)  # fmt: skip
    ds = load_dataset(cfg, rng=np.random.default_rng(0))
    _check_dataset(ds)
    assert ds.input_shape == (3, 32, 32) and len(ds.y_train) == 500 and len(ds.y_test) == 200
    assert np.array_equal(np.bincount(ds.y_train), np.full(10, 50))
    assert np.abs(ds.x_train.mean(axis=(0, 2, 3))).max() < 0.15


@pytest.mark.slow
@needs_shared_data
def test_real_cardio():
    ds = load_dataset(DataConfig(name="cardio", path=str(SHARED_DATA / "cardio")))
    _check_dataset(ds)
    assert ds.input_shape == (11,) and len(ds.y_train) == 60000 and len(ds.y_test) == 10000
    assert np.abs(ds.x_train.mean(axis=0)).max() < 0.05


def test_bundled_fashion_mnist_mini_needs_no_files():
    from secure_dfml.config import DataConfig
    from secure_dfml.data import load_dataset

    ds = load_dataset(DataConfig(name="fashion-mnist-mini", max_train_samples=1000))
    assert ds.input_shape == (1, 14, 14) and ds.num_classes == 10
    assert len(ds.y_train) == 1000 and len(ds.y_test) == 2000
    assert abs(float(ds.x_train.mean())) < 0.1  # fixed Fashion-MNIST constants centre the data
    full = load_dataset(DataConfig(name="fashion-mnist-mini"))  # all 60,000 training images, 6,000 per class
    assert np.bincount(full.y_train).tolist() == [6000] * 10 and np.bincount(full.y_test).tolist() == [200] * 10
