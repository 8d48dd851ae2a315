"""`emformer cluster DIR data.csv|data.npy [--k K] [--out labels.csv]`: round trips and every bad input file."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from emformer import Clusterer
from emformer.errors import DataError
from emformer.train.cli import main
from emformer.train.cluster import read_points


def _two_blobs(n: int = 80, d: int = 4, separation: float = 8.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    shift = np.zeros(d)
    shift[0] = separation
    return rng.normal(size=(n, d)) + labels[:, None] * shift + 10.0, labels


def _error(pred: np.ndarray, truth: np.ndarray) -> float:
    wrong = float(np.mean(pred != truth))
    return min(wrong, 1 - wrong)  # two clusters: labels are defined up to a swap


@pytest.mark.slow
def test_cli_round_trip_on_a_csv(tiny_export: Path, tmp_path: Path, capsys) -> None:
    """CSV in, labels.csv out: one label a line, in row order, the same as the Python API's, and right on
    well-separated blobs."""
    X, truth = _two_blobs()
    data = tmp_path / "points.csv"
    np.savetxt(data, X, delimiter=",", fmt="%.6f")
    out = tmp_path / "labels.csv"
    assert main(["cluster", str(tiny_export), str(data), "--k", "2", "--out", str(out)]) == 0
    labels = np.loadtxt(out, dtype=int)
    assert labels.shape == (80,)
    expected = Clusterer.from_pretrained(tiny_export, n_clusters=2, random_state=0).fit_predict(np.loadtxt(data, delimiter=","))
    np.testing.assert_array_equal(labels, expected)
    assert _error(labels, truth) <= 0.05
    err = capsys.readouterr().err
    assert "clustered 80 points of dimension 4 into 2 clusters" in err and str(out) in err


def test_npy_to_stdout_and_header_skipping(fake_export: Path, tmp_path: Path, capsys) -> None:
    X, _ = _two_blobs(n=30, d=3)
    np.save(tmp_path / "points.npy", X)
    assert main(["cluster", str(fake_export), str(tmp_path / "points.npy"), "--init", "spectral",
                 "--standardize", "features", "--passes", "2", "--init-iters", "0"]) == 0
    printed = capsys.readouterr().out.split()
    assert len(printed) == 30 and set(printed) <= {"0", "1"}
    with_header = tmp_path / "with_header.csv"
    with_header.write_text("x,y,z\n# a comment\n\n" + "\n".join(",".join(f"{v}" for v in row) for row in X) + "\n")
    np.testing.assert_array_equal(read_points(with_header, skip_header=True), X)


@pytest.mark.parametrize("content, message", [
    ("x,y\n1,2\n3,4\n", r"line 1, column 1: 'x' is not a number; it looks like a header: remove it or pass --skip-header"),
    ("1,2\n3,abc\n", r"line 2, column 2: 'abc' is not a number$"),
    ("1,2\n3,nan\n", r"line 2, column 2: 'nan' is not a finite number"),
    ("1,2\n3,-inf\n", r"line 2, column 2: '-inf' is not a finite number"),
    ("1,2\n3,4,5\n", "line 2 has 3 columns, earlier lines have 2"),
    ("# only a comment\n\n", "no data rows"),
])
def test_bad_csv_is_named(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "data.csv"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        read_points(path)


def test_bad_npy_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file"):
        read_points(tmp_path / "nope.csv")
    np.save(tmp_path / "cube.npy", np.zeros((2, 3, 4)))
    with pytest.raises(DataError, match=r"expected a 2-d array \(n_points, n_features\), got shape \(2, 3, 4\)"):
        read_points(tmp_path / "cube.npy")
    np.save(tmp_path / "text.npy", np.array([["a", "b"]]))
    with pytest.raises(DataError, match="expected a real numeric array, got dtype <U1"):
        read_points(tmp_path / "text.npy")
    bad = np.ones((3, 2))
    bad[2, 1] = np.inf
    np.save(tmp_path / "inf.npy", bad)
    with pytest.raises(DataError, match="row 2, column 1: inf is not a finite number"):
        read_points(tmp_path / "inf.npy")
    (tmp_path / "fake.npy").write_bytes(b"garbage")
    with pytest.raises(DataError, match="not a readable .npy array"):
        read_points(tmp_path / "fake.npy")
    (tmp_path / "binary.csv").write_bytes(b"\xff\xfe\x00\x01")
    with pytest.raises(DataError, match="not a text CSV file"):
        read_points(tmp_path / "binary.csv")


@pytest.mark.parametrize("args, message", [
    (["--k", "3"], "n_clusters: this model supports 2 <= k <= 2"),
    (["--k", "1"], "got k=1"),
])
def test_cli_errors_are_one_line(fake_export: Path, tmp_path: Path, capsys, args: list[str], message: str) -> None:
    data = tmp_path / "points.csv"
    np.savetxt(data, _two_blobs(n=20)[0], delimiter=",")
    assert main(["cluster", str(fake_export), str(data), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("emformer cluster: error:") and message in err and "\n" not in err


def test_cli_bad_model_dir_and_too_few_points(fake_export: Path, tmp_path: Path, capsys) -> None:
    data = tmp_path / "points.csv"
    data.write_text("1,2,3,4\n")
    assert main(["cluster", str(fake_export), str(data)]) == 2
    assert "X: 1 point(s) but n_clusters=2" in capsys.readouterr().err
    assert main(["cluster", str(tmp_path / "no-export"), str(data)]) == 2
    assert "no such export directory" in capsys.readouterr().err
    wide = tmp_path / "wide.csv"
    np.savetxt(wide, np.zeros((10, 9)), delimiter=",")
    assert main(["cluster", str(fake_export), str(wide), "--out", str(tmp_path / "labels.csv")]) == 2
    assert "has 9 features but this model takes at most d=4" in capsys.readouterr().err
    assert not (tmp_path / "labels.csv").exists()


def test_cli_with_a_shipped_model_by_name_and_auto_k(tmp_path: Path, capsys) -> None:
    """`emformer cluster emformer-gmm-small data.csv --k auto` gives the Python API's labels."""
    X, _ = _two_blobs(n=60, d=3)
    data = tmp_path / "points.csv"
    np.savetxt(data, X, delimiter=",", fmt="%.6f")
    out = tmp_path / "labels.csv"
    assert main(["cluster", "emformer-gmm-small", str(data), "--k", "auto", "--n-init", "2", "--em-steps", "1",
                 "--out", str(out)]) == 0
    expected = Clusterer.from_pretrained("emformer-gmm-small", n_clusters="auto", n_init=2, em_steps=1,
                                         random_state=0).fit_predict(np.loadtxt(data, delimiter=","))
    np.testing.assert_array_equal(np.loadtxt(out, dtype=int), expected)


def test_cli_k_must_be_an_integer_or_auto(tmp_path: Path) -> None:
    data = tmp_path / "points.csv"
    np.savetxt(data, _two_blobs(n=20)[0], delimiter=",")
    with pytest.raises(SystemExit):
        main(["cluster", "emformer-gmm-small", str(data), "--k", "three"])


def test_warnings_are_one_line_without_source(fake_export: Path, tmp_path: Path, capsys) -> None:
    """n = 40 is outside the fake export's trained n = 32: one warning line, no file:line nor source dump."""
    X, _ = _two_blobs(n=40, d=4)
    np.save(tmp_path / "points.npy", X)
    assert main(["cluster", str(fake_export), str(tmp_path / "points.npy")]) == 0
    err = capsys.readouterr().err.splitlines()
    warned = [line for line in err if "warning" in line.lower()]
    assert warned == ["emformer cluster: warning: X: n=40 (trained on n in [32, 32]) is outside the range this "
                      "model was trained on; it runs, but was never trained there"]
    assert len(err) == 2 and err[1].startswith("clustered 40 points")
