"""`emformer cluster DIR|NAME data.csv|data.npy [--k K|auto] [--out labels.csv]`: label points with an exported
model (an export directory, or a shipped model by name, e.g. emformer-gmm-small).

The input is a numeric CSV (one point a row, comma-separated, no header unless --skip-header; blank lines
and lines starting with # are skipped) or a 2-d .npy array. The output is one integer label a line, in the
input's row order, written atomically to --out or printed to stdout. A summary goes to stderr. Imports torch
and the model, never lightning (see `emformer.models.clusterer`).
"""
from __future__ import annotations

import argparse
import csv
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from emformer.atomic import atomic_write_text
from emformer.errors import DataError
from emformer.models.clusterer import AUTO, INIT_MODES, Clusterer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", help="export directory written by `emformer export`, or the name of a shipped "
                        "model (emformer-gmm-small)")
    parser.add_argument("data", help="points to cluster: a CSV file (one point a row) or a .npy array (n, d)")
    parser.add_argument("--k", type=_k_value, default=None, help="number of clusters, or 'auto' (the model's count "
                        "head picks it); default: the k the model was trained on")
    parser.add_argument("--out", default=None, help="write the labels here (one a line); default: stdout")
    parser.add_argument("--init", choices=INIT_MODES, default="kmeans++", help="initial centroids (default kmeans++)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the k-means++ / spectral draws (default 0)")
    parser.add_argument("--standardize", choices=("isotropic", "features", "none"), default="isotropic",
                        help="isotropic (default): centre, one common scale to the training spread; features: "
                             "z-score each feature (unrelated units); none: the data as it is")
    parser.add_argument("--init-iters", type=int, default=None,
                        help="Lloyd iterations refining the initial centroids (default: 10, or 0 when the model "
                             "was trained with that init)")
    # Unset (None) leaves these to the model's config.json clusterer_defaults, else the Clusterer's own.
    parser.add_argument("--passes", type=int, default=None,
                        help="model passes, each from the last's centroids (default: the passes the model was "
                             "trained for, 1 for exports from before model.passes)")
    parser.add_argument("--n-init", type=int, default=None, help="starts (k-means++ draws); the best fitted "
                        "likelihood is kept (default: the model's clusterer_defaults, else 1)")
    parser.add_argument("--em-steps", type=int, default=None,
                        help="EM iterations from the model's assignment (default: the model's clusterer_defaults, else 0)")
    parser.add_argument("--skip-header", action="store_true", help="the CSV's first line is a header: skip it")
    parser.add_argument("--device", default="cpu", help="torch device for the model (default cpu)")


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    points = read_points(Path(args.data), skip_header=args.skip_header)
    standardize = False if args.standardize == "none" else args.standardize
    given = {key: value for key, value in (("n_passes", args.passes), ("n_init", args.n_init),
                                           ("em_steps", args.em_steps), ("init_iters", args.init_iters))
             if value is not None}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        clusterer = Clusterer.from_pretrained(args.model_dir, device=args.device, n_clusters=args.k,
                                              init=args.init, random_state=args.seed, standardize=standardize,
                                              **given)
        labels = clusterer.fit_predict(points)
    # One line each, as the command's errors are: a user of the command has no use for our source lines.
    for message in dict.fromkeys(str(w.message) for w in caught):
        print(f"emformer cluster: warning: {message}", file=sys.stderr)
    text = "".join(f"{int(label)}\n" for label in labels)
    if args.out:
        atomic_write_text(args.out, text)
    else:
        sys.stdout.write(text)
        sys.stdout.flush()
    sizes = np.bincount(labels, minlength=clusterer.cluster_centers_.shape[0]).tolist()
    print(f"clustered {len(labels)} points of dimension {points.shape[1]} into {len(sizes)} clusters "
          f"(sizes {sizes}) in {time.perf_counter() - started:.2f} s" + (f"; labels in {args.out}" if args.out else ""),
          file=sys.stderr)
    return 0


def _k_value(text: str) -> int | str:
    if text == AUTO:
        return AUTO
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or '{AUTO}', got {text!r}") from None


def read_points(path: Path, skip_header: bool = False) -> np.ndarray:
    """A (n, d) float64 array from a .npy file or a numeric CSV; DataError naming the file, line and column."""
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if path.suffix == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise DataError(f"{path}: not a readable .npy array ({exc})") from None
        if array.ndim != 2:
            raise DataError(f"{path}: expected a 2-d array (n_points, n_features), got shape {array.shape}")
        if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
            raise DataError(f"{path}: expected a real numeric array, got dtype {array.dtype}")
        array = array.astype(np.float64)
        bad = np.argwhere(~np.isfinite(array))
        if len(bad):
            raise DataError(f"{path}: row {bad[0][0]}, column {bad[0][1]}: {array[tuple(bad[0])]} is not a finite number")
        return array
    return read_csv(path, skip_header=skip_header)


def read_csv(path: Path, skip_header: bool = False) -> np.ndarray:
    rows: list[list[float]] = []
    width = None
    header_pending = skip_header
    try:
        handle = open(path, newline="", encoding="utf-8")
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None
    with handle:
        try:
            for line_no, cells in enumerate(csv.reader(handle), start=1):
                if not cells or all(not cell.strip() for cell in cells) or cells[0].lstrip().startswith("#"):
                    continue
                if header_pending:
                    header_pending = False
                    continue
                values = []
                for col, cell in enumerate(cells, start=1):
                    try:
                        value = float(cell)
                    except ValueError:
                        hint = ("; it looks like a header: remove it or pass --skip-header"
                                if not rows and not _any_number(cells) else "")
                        raise DataError(f"{path}: line {line_no}, column {col}: {cell.strip()!r} is not a number{hint}") from None
                    if not math.isfinite(value):
                        raise DataError(f"{path}: line {line_no}, column {col}: {cell.strip()!r} is not a finite "
                                        f"number (NaN / inf); drop or impute it first")
                    values.append(value)
                if width is None:
                    width = len(values)
                elif len(values) != width:
                    raise DataError(f"{path}: line {line_no} has {len(values)} columns, earlier lines have {width}")
                rows.append(values)
        except UnicodeDecodeError:
            raise DataError(f"{path}: not a text CSV file (use .npy for binary arrays)") from None
        except csv.Error as exc:
            raise DataError(f"{path}: not a valid CSV ({exc})") from None
    if not rows:
        raise DataError(f"{path}: no data rows")
    return np.asarray(rows, dtype=np.float64)


def _any_number(cells: list[str]) -> bool:
    for cell in cells:
        try:
            float(cell)
            return True
        except ValueError:
            pass
    return False
