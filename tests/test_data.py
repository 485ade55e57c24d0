"""Data sources: built-ins, conversions, inference of the task, file formats and their errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset, TensorDataset

from gradwise.data import (
    DATASETS,
    DataBundle,
    as_dataset,
    decode_chars,
    describe,
    load_data,
    split_indices,
    train_val_split,
)
from gradwise.errors import ConfigError, DataError

# name -> (input_shape, target_shape, task, num_classes)
BUILTINS = {
    "iris": ((4,), (), "multiclass", 3),
    "wine": ((13,), (), "multiclass", 3),
    "breast_cancer": ((30,), (), "binary", 2),
    "digits": ((1, 8, 8), (), "multiclass", 10),
    "diabetes": ((10,), (), "regression", None),
    "text": ((128,), (128,), "lm", None),
    "synthetic_classification": ((20,), (), "multiclass", 3),
    "synthetic_regression": ((10,), (), "regression", None),
    "synthetic_multilabel": ((20,), (5,), "multilabel", 5),
    "synthetic_sequences": ((32,), (), "binary", 2),
    "synthetic_images": ((1, 16, 16), (), "multiclass", 4),
}


def _all(ds: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*(ds[i] for i in range(len(ds))), strict=True)
    return torch.stack(xs), torch.stack(ys)


# --------------------------------------------------------------------------- built-ins


@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_builtin_loads_with_complete_info(name: str) -> None:
    input_shape, target_shape, task, _ = BUILTINS[name]
    bundle = load_data(name)
    info = bundle.info
    assert isinstance(bundle, DataBundle)
    assert (info.input_shape, info.target_shape, info.task, info.num_classes) == BUILTINS[name]
    assert info.n_train == len(bundle.train) > 0 and info.n_val == len(bundle.val) > 0
    x, y = bundle.train[0]
    assert tuple(x.shape) == input_shape and tuple(y.shape) == target_shape
    assert (
        str(x.dtype) == f"torch.{info.input_dtype}" and str(y.dtype) == f"torch.{info.target_dtype}"
    )
    if task in ("binary", "multiclass"):
        assert y.dtype == torch.int64
    if task == "lm":
        assert info.vocab_size and info.seq_len == 128 and "char_vocab" in info.preprocessing
    val_fraction = info.n_val / (info.n_train + info.n_val)
    assert 0.15 < val_fraction < 0.25


def test_every_builtin_takes_val_fraction_and_seed() -> None:
    import inspect

    for name in DATASETS:
        params = inspect.signature(DATASETS[name]).parameters
        assert params["val_fraction"].default == 0.2 and params["seed"].default == 0, name


@pytest.mark.parametrize("name", ["iris", "diabetes", "synthetic_images"])
def test_split_is_deterministic_per_seed(name: str) -> None:
    a, b, c = load_data(name), load_data(name), load_data(name, {"seed": 1})
    xa, xb, xc = (_all(bundle.val)[0] for bundle in (a, b, c))
    assert torch.equal(xa, xb)
    assert xa.shape == xc.shape and not torch.equal(xa, xc)


def test_features_standardised_with_train_statistics_only() -> None:
    from sklearn.datasets import load_wine

    raw = load_wine()
    train, _ = split_indices(len(raw.target), raw.target, 0.2, 0)
    bundle = load_data("wine")
    record = bundle.info.preprocessing["standardize"]
    np.testing.assert_allclose(record["mean"], raw.data[train].mean(0), rtol=1e-6)
    np.testing.assert_allclose(record["std"], raw.data[train].std(0), rtol=1e-6)
    assert not np.allclose(record["mean"], raw.data.mean(0), rtol=1e-6)  # not the full data's
    x_train, _ = _all(bundle.train)
    assert (
        x_train.mean(0).abs().max() < 1e-4
        and (x_train.std(0, unbiased=False) - 1).abs().max() < 1e-3
    )
    x_val, _ = _all(bundle.val)
    assert x_val.mean(0).abs().max() > 1e-3  # val is transformed with train statistics, not its own


def test_digits_images_scaled_then_standardised_and_flatten_option() -> None:
    from sklearn.datasets import load_digits

    raw = load_digits()
    train, _ = split_indices(len(raw.target), raw.target, 0.2, 0)
    bundle = load_data("digits")
    assert bundle.info.preprocessing["scale"] == pytest.approx(1 / 16)
    assert bundle.info.preprocessing["standardize"]["mean"] == [
        pytest.approx(raw.images[train].mean() / 16)
    ]
    assert bundle.info.class_names == [str(i) for i in range(10)]
    flat = load_data("digits", {"flatten": True})
    assert flat.info.input_shape == (64,)
    assert torch.allclose(flat.train[0][0], bundle.train[0][0].flatten())


def test_diabetes_uses_raw_features_and_records_target_scaling() -> None:
    from sklearn.datasets import load_diabetes

    raw = load_diabetes(scaled=False)
    train, val = split_indices(len(raw.target), raw.target, 0.2, 0, stratify=False)
    bundle = load_data("diabetes")
    target = bundle.info.preprocessing["target_standardize"]
    assert target["mean"] == pytest.approx(raw.target[train].mean())
    assert target["std"] == pytest.approx(raw.target[train].std())
    _, y_val = _all(bundle.val)
    np.testing.assert_allclose(y_val * target["std"] + target["mean"], raw.target[val], rtol=1e-5)
    x_train, y_train = _all(bundle.train)
    assert (
        abs(float(y_train.mean())) < 1e-4
        and (x_train.std(0, unbiased=False) - 1).abs().max() < 1e-3
    )


def test_stratified_split_keeps_class_proportions() -> None:
    y = np.array([0] * 90 + [1] * 10)
    train, val = split_indices(100, y, 0.2, seed=3)
    assert len(val) == 20 and np.bincount(y[val]).tolist() == [18, 2]
    assert set(train).isdisjoint(val) and len(train) + len(val) == 100
    bundle = load_data("breast_cancer")
    p_train = _all(bundle.train)[1].float().mean()
    p_val = _all(bundle.val)[1].float().mean()
    assert abs(p_train - p_val) < 0.01


def test_train_val_split_pairs_and_zero_fraction() -> None:
    X, y = torch.arange(20.0).reshape(10, 2), torch.arange(10) % 2
    (x_tr, y_tr), (x_va, _) = train_val_split(X, y, 0.3, seed=0)
    assert len(x_va) == 3 and torch.equal((x_tr[:, 0] / 2 % 2).long(), y_tr)  # pairs stay aligned
    assert torch.equal(torch.cat([x_tr, x_va]).sort(0).values, X)
    _, none = train_val_split(X, y, 0.0)
    assert none is None
    with pytest.raises(ConfigError, match=r"data\.kwargs\.val_fraction"):
        train_val_split(X, y, 1.5)


# --------------------------------------------------------------------------- as_dataset, describe


def test_as_dataset_conversions() -> None:
    ds = TensorDataset(torch.zeros(2, 3), torch.zeros(2))
    assert as_dataset(ds) is ds
    data = as_dataset((np.zeros((5, 3)), np.arange(5, dtype=np.int32)))
    x, y = data[0]
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and y.shape == ()
    x, y = as_dataset((torch.zeros(4, 2, dtype=torch.float64), np.linspace(0, 1, 4)))[0]
    assert x.dtype == torch.float32 and y.dtype == torch.float32 and y.shape == ()
    x, _ = as_dataset(([[1, 2], [3, 4]], [0, 1]))[0]
    assert x.dtype == torch.int64  # integer inputs are token ids


def test_as_dataset_errors() -> None:
    with pytest.raises(DataError, match=r"X has 5 samples but y has 4"):
        as_dataset((np.zeros((5, 2)), np.zeros(4)))
    with pytest.raises(DataError, match="class indices"):
        as_dataset((np.zeros((2, 2)), np.array(["a", "b"])))
    with pytest.raises(DataError, match="expected a torch Dataset"):
        as_dataset({"X": 1})


class _Pairs(Dataset):
    """A plain Dataset with no .tensors or .targets: describe() has to scan it."""

    def __init__(self, xs: torch.Tensor, ys: torch.Tensor) -> None:
        self.xs, self.ys = xs, ys

    def __len__(self) -> int:
        return len(self.xs)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.xs[i], self.ys[i]


@pytest.mark.parametrize(
    ("x", "y", "task", "extra"),
    [
        (torch.randn(10, 3), torch.arange(10) % 2, "binary", {"num_classes": 2}),
        (torch.randn(10, 3), torch.arange(10) % 4, "multiclass", {"num_classes": 4}),
        (
            torch.randn(10, 3),
            (torch.arange(20).reshape(10, 2) % 3 == 0).float(),
            "multilabel",
            {"num_classes": 2},
        ),
        (torch.randn(10, 3), torch.randn(10), "regression", {"num_classes": None}),
        (
            torch.randint(0, 7, (10, 5)),
            torch.randint(0, 9, (10, 5)),
            "lm",
            {"vocab_size": 9, "seq_len": 5},
        ),
    ],
)
def test_describe_infers_task(x: torch.Tensor, y: torch.Tensor, task: str, extra: dict) -> None:
    y[0] = y.max() if task != "lm" else 8  # make the largest class/token present for an exact count
    for ds in (TensorDataset(x, y), _Pairs(x, y)):
        info = describe(ds, "mine")
        assert info.task == task and info.name == "mine" and info.n_train == 10
        assert info.input_shape == tuple(x.shape[1:]) and info.target_shape == tuple(y.shape[1:])
        assert {k: getattr(info, k) for k in extra} == extra


def test_describe_scans_at_most_max_scan_and_reads_targets_attribute() -> None:
    ds = _Pairs(torch.randn(50, 2), torch.arange(50) % 5)
    info = describe(ds, max_scan=10)
    assert info.num_classes == 5 and any("first 10 of 50" in n for n in info.notes)
    ds.targets, ds.classes = torch.arange(50) % 7, [f"c{i}" for i in range(7)]
    info = describe(ds, max_scan=10)
    assert info.num_classes == 7 and info.class_names[6] == "c6"
    with pytest.raises(DataError, match=r"\(input, target\)"):
        describe([torch.zeros(3)])


# --------------------------------------------------------------------------- csv and numpy files


def _write_csv(tmp_path, text: str):
    path = tmp_path / "flowers.csv"
    path.write_text(text)
    return path


CSV = "a,b,label\n" + "".join(f"{i},{i % 3 * 2.5},{'cat' if i % 2 else 'dog'}\n" for i in range(20))


def test_csv_with_string_target(tmp_path) -> None:
    bundle = load_data("csv", {"path": str(_write_csv(tmp_path, CSV)), "target": "label"})
    info = bundle.info
    assert info.name == "flowers" and info.task == "binary" and info.class_names == ["cat", "dog"]
    assert (
        info.feature_names == ["a", "b"]
        and info.input_shape == (2,)
        and info.n_train + info.n_val == 20
    )
    _, y = _all(bundle.train)
    assert y.dtype == torch.int64 and set(y.tolist()) == {0, 1}
    assert "standardize" in info.preprocessing


def test_csv_regression_and_feature_subset(tmp_path) -> None:
    text = "x,z,price\n" + "".join(f"{i},{i * i},{i * 1.37:.2f}\n" for i in range(30))
    bundle = load_data(
        "csv", {"path": str(_write_csv(tmp_path, text)), "target": "price", "features": ["x"]}
    )
    assert bundle.info.task == "regression" and bundle.info.input_shape == (1,)
    assert "target_standardize" in bundle.info.preprocessing


def test_csv_errors_name_the_problem(tmp_path) -> None:
    path = _write_csv(tmp_path, CSV)
    with pytest.raises(DataError, match="did you mean 'label'"):
        load_data("csv", {"path": str(path), "target": "lable"})
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b,label\n1,2,x\n3,oops,y\n")
    with pytest.raises(DataError, match=r"column 'b', row 2 \(line 3\): 'oops'"):
        load_data("csv", {"path": str(bad), "target": "label"})
    with pytest.raises(DataError, match=r"nowhere\.csv does not exist"):
        load_data("csv", {"path": str(tmp_path / "nowhere.csv"), "target": "label"})
    headless = tmp_path / "headless.csv"
    headless.write_text("1,2,3\n4,5,6\n")
    with pytest.raises(DataError, match="header row"):
        load_data("csv", {"path": str(headless), "target": "3"})
    with pytest.raises(ConfigError, match=r"data\.kwargs\.target"):
        load_data("csv", {"path": str(path)})


def test_numpy_npz_and_npy_pairs(tmp_path) -> None:
    x, y = np.random.default_rng(0).normal(size=(40, 3)), np.arange(40) % 4
    np.savez(tmp_path / "d.npz", X=x, y=y)
    bundle = load_data("numpy", {"path": str(tmp_path / "d.npz")})
    assert (
        bundle.info.task == "multiclass" and bundle.info.num_classes == 4 and bundle.info.n_val == 8
    )
    np.save(tmp_path / "X.npy", x)
    np.save(tmp_path / "y.npy", x[:, 0])
    info = load_data("numpy", {"x": str(tmp_path / "X.npy"), "y": str(tmp_path / "y.npy")}).info
    assert info.task == "regression" and info.input_dtype == "float32"
    with pytest.raises(
        DataError,
        match=r"d\.npz has no array 'x' \(data\.kwargs\.x_key\); arrays in the file: X, y",
    ):
        load_data("numpy", {"path": str(tmp_path / "d.npz"), "x_key": "x"})


# --------------------------------------------------------------------------- images and text


def test_image_folder(tmp_path) -> None:
    from PIL import Image

    for label, colour in (("cats", (250, 10, 10)), ("dogs", (10, 10, 250))):
        (tmp_path / label).mkdir()
        for i in range(5):
            Image.new("RGB", (12, 10), tuple(c - i for c in colour)).save(
                tmp_path / label / f"{i}.png"
            )
    (tmp_path / "empty").mkdir()
    bundle = load_data(
        "image_folder", {"path": str(tmp_path), "image_size": 8, "val_fraction": 0.4}
    )
    info = bundle.info
    assert (
        info.input_shape == (3, 8, 8)
        and info.class_names == ["cats", "dogs"]
        and info.task == "binary"
    )
    assert (info.n_train, info.n_val) == (6, 4)
    assert sorted(_all(bundle.val)[1].tolist()) == [0, 0, 1, 1]  # stratified
    x_train, _ = _all(bundle.train)
    assert x_train.mean((0, 2, 3)).abs().max() < 1e-4
    assert len(info.preprocessing["standardize"]["mean"]) == 3
    assert any("empty" in n for n in info.notes)
    gray = load_data("image_folder", {"path": str(tmp_path), "image_size": 4, "grayscale": True})
    assert gray.info.input_shape == (1, 4, 4)
    with pytest.raises(DataError, match="nowhere"):
        load_data("image_folder", {"path": str(tmp_path / "nowhere")})


def test_text_windows_shift_by_one_and_vocab_covers_text(tmp_path) -> None:
    bundle = load_data("text", {"seq_len": 16})
    vocab = bundle.info.preprocessing["char_vocab"]
    x, y = bundle.train[3]
    assert torch.equal(x[1:], y[:-1]) and x.shape == (16,)
    assert torch.equal(bundle.train[4][0][0:1], y[-1:])  # stride = seq_len: windows tile the text
    from gradwise.data.text import SHIPPED_TEXT

    content = SHIPPED_TEXT.read_text()
    assert set(content) == set(vocab) and 100_000 < len(content) < 200_000
    assert decode_chars(bundle.train[0][0], vocab) == content[:16]
    cut = bundle.info.n_train * 16 + 1
    assert bundle.val.tokens.numel() + bundle.train.tokens.numel() == len(content) >= cut
    path = tmp_path / "tiny.txt"
    path.write_text("abcdefghij" * 10)
    tiny = load_data("text", {"path": str(path), "seq_len": 4, "stride": 1, "val_fraction": 0.2})
    assert (
        len(tiny.train) == 80 - 4
        and decode_chars(tiny.val[0][1], tiny.info.preprocessing["char_vocab"]) == "bcde"
    )
    with pytest.raises(DataError, match="shorter than seq_len"):
        load_data("text", {"path": str(path), "seq_len": 50})


# --------------------------------------------------------------------------- synthetic


def test_synthetic_sets_are_deterministic_and_follow_their_rule() -> None:
    kwargs = {"n_samples": 60, "seq_len": 10, "vocab_size": 6, "n_classes": 3}
    a, b = load_data("synthetic_sequences", kwargs), load_data("synthetic_sequences", kwargs)
    x, y = _all(a.train)
    assert torch.equal(x, _all(b.train)[0]) and torch.equal((x == 1).sum(1), y)
    other = load_data("synthetic_sequences", {**kwargs, "seed": 1})
    assert not torch.equal(x, _all(other.train)[0])
    lm = load_data("synthetic_sequences", {"task": "lm", "n_samples": 20, "noise": 0.0})
    xs, ys = _all(lm.train)
    perm = {int(i): int(j) for i, j in zip(xs.flatten(), ys.flatten(), strict=True)}
    assert all(perm[int(i)] == int(j) for i, j in zip(xs.flatten(), ys.flatten(), strict=True))
    imbalanced = load_data(
        "synthetic_classification", {"n_classes": 2, "weights": [0.9, 0.1], "noise": 0.0}
    )
    assert _all(imbalanced.train)[1].float().mean() < 0.2
    assert load_data("synthetic_regression", {"n_targets": 2}).info.target_shape == (2,)


# --------------------------------------------------------------------------- load_data and errors


def make_xy():
    return np.random.default_rng(0).normal(size=(30, 2)), np.arange(30) % 3


def make_pair(n: int = 8):
    train = TensorDataset(torch.zeros(n, 2), torch.zeros(n))
    return train, TensorDataset(torch.zeros(2, 2), torch.zeros(2))


def test_import_path_factories_are_normalised() -> None:
    bundle = load_data(f"{__name__}:make_xy", {})
    assert bundle.info.task == "multiclass" and (bundle.info.n_train, bundle.info.n_val) == (24, 6)
    bundle = load_data(f"{__name__}:make_pair", {"n": 5})
    assert bundle.info.name == "make_pair" and (bundle.info.n_train, bundle.info.n_val) == (5, 2)
    with pytest.raises(ConfigError, match=r"data\.kwargs\.m: .*make_pair' \(n\)"):
        load_data(f"{__name__}:make_pair", {"m": 5})


def test_load_data_errors_name_the_field() -> None:
    with pytest.raises(ConfigError, match=r"data\.name: got 'digts'.*did you mean 'digits'"):
        load_data("digts")
    with pytest.raises(
        ConfigError, match=r"data\.kwargs\.val_fracton: .*did you mean 'val_fraction'"
    ):
        load_data("iris", {"val_fracton": 0.1})
    with pytest.raises(ConfigError, match=r"data\.kwargs\.val_fraction"):
        load_data("iris", {"val_fraction": 1.0})
    with pytest.raises(ConfigError, match=r"data\.kwargs\.task.*did you mean 'lm'"):
        load_data("synthetic_sequences", {"task": "lmm"})
    with pytest.raises(ConfigError, match=r"data\.kwargs\.seq_len"):
        load_data("text", {"seq_len": 0})
