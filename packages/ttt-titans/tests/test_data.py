"""ETT CSV loader, splits and windows, checked against numpy computations written here."""

from __future__ import annotations

import gzip
import importlib.util
import itertools
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from ttt_titans.config import load_config
from ttt_titans.data import (
    WindowDataset,
    embedded_path,
    load_embedded,
    load_ett_csv,
    make_splits,
)
from ttt_titans.train import build_splits

TOOL = Path(__file__).resolve().parents[1] / "tools" / "make_beijing_pm25.py"


def _write_csv(path, n=40, cols=("HUFL", "MULL", "OT"), seed=0):
    rng = np.random.default_rng(seed)
    vals = rng.normal(size=(n, len(cols)))
    lines = ["date," + ",".join(cols)]
    for i in range(n):
        lines.append(f"{_hour(i)}," + ",".join(f"{v:.6f}" for v in vals[i]))
    path.write_text("\n".join(lines) + "\n")
    return np.round(vals, 6)


def _hour(i: int) -> str:
    """ISO timestamp of hour i after 2016-07-01 00:00."""
    return f"{datetime(2016, 7, 1) + timedelta(hours=i):%Y-%m-%d %H:%M:%S}"


def test_load_ett_csv_roundtrip(tmp_path):
    vals = _write_csv(tmp_path / "ett.csv")
    s = load_ett_csv(tmp_path / "ett.csv", target="OT")
    assert s.columns == ["HUFL", "MULL", "OT"]
    assert s.target_index == 2
    np.testing.assert_allclose(s.values, vals, atol=1e-9)
    assert s.dates[1] == "2016-07-01 01:00:00"


def test_load_gzip(tmp_path):
    vals = _write_csv(tmp_path / "ett.csv")
    with gzip.open(tmp_path / "ett.csv.gz", "wb") as fh:
        fh.write((tmp_path / "ett.csv").read_bytes())
    s = load_ett_csv(tmp_path / "ett.csv.gz", target="OT")
    np.testing.assert_allclose(s.values, vals, atol=1e-9)


MALFORMED = {
    "no-date-column": ("time,OT\n1,2.0\n", r"has no 'date' column"),
    "repeated-column": (
        "date,OT,OT\n2016-01-01,1.0,2.0\n",
        r"column names repeat in the header: \['OT'\]",
    ),
    "non-numeric": (
        "date,HUFL,OT\n2016-01-01,1.0,2.0\n2016-01-02,abc,3.0\n",
        r"line 3, column 'HUFL': non-numeric value 'abc'",
    ),
    "ragged-row": ("date,HUFL,OT\n2016-01-01,1.0,2.0\n2016-01-02,3.0\n", r"line 3: 2 fields"),
    "date-not-iso": (
        "date,OT\n07/01/2016 00:00,1.0\n07/01/2016 01:00,2.0\n",
        r"line 2: date '07/01/2016 00:00' is not an ISO 8601 timestamp",
    ),
}


@pytest.mark.parametrize(("text", "message"), MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_file_names_file_line_and_problem(tmp_path, text, message):
    (tmp_path / "bad.csv").write_text(text)
    with pytest.raises(ValueError, match=rf"data file '.*bad\.csv'.* {message}"):
        load_ett_csv(tmp_path / "bad.csv")


def test_too_short_for_one_window(tmp_path):
    _write_csv(tmp_path / "short.csv", n=10)
    with pytest.raises(ValueError, match="too short for one window"):
        load_ett_csv(tmp_path / "short.csv", min_rows=10 + 1)
    load_ett_csv(tmp_path / "short.csv", min_rows=10)  # exactly one window is fine


def test_missing_target_and_file(tmp_path):
    _write_csv(tmp_path / "ett.csv")
    with pytest.raises(ValueError, match="target column 'Demand'"):
        load_ett_csv(tmp_path / "ett.csv", target="Demand")
    with pytest.raises(ValueError, match="does not exist"):
        load_ett_csv(tmp_path / "nope.csv")


@pytest.mark.parametrize(
    ("hours", "message"),
    [((6, 5), "goes back to"), ((5, 5), "repeats")],
    ids=["unsorted", "duplicated"],
)
def test_dates_must_strictly_increase(tmp_path, hours, message):
    """A misordered file would put the future into the train split: rejected, naming the lines."""
    _write_csv(tmp_path / "ett.csv", n=30)
    lines = (tmp_path / "ett.csv").read_text().splitlines()
    for row, hour in zip((5, 6), hours):  # data rows 5 and 6 are file lines 7 and 8
        lines[1 + row] = f"{_hour(hour)},{lines[1 + row].split(',', 1)[1]}"
    (tmp_path / "ett.csv").write_text("\n".join(lines) + "\n")
    expected = rf"ett\.csv' line 8: date '2016-07-01 05:00:00' {message} the date of line 7"
    with pytest.raises(ValueError, match=rf"{expected}.*sort the file"):
        load_ett_csv(tmp_path / "ett.csv")


def test_utf8_bom_is_read(tmp_path):
    vals = _write_csv(tmp_path / "ett.csv")
    text = (tmp_path / "ett.csv").read_text()
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbf" + text.encode())
    with gzip.open(tmp_path / "bom.csv.gz", "wb") as fh:
        fh.write(b"\xef\xbb\xbf" + text.encode())
    for name in ("bom.csv", "bom.csv.gz"):
        s = load_ett_csv(tmp_path / name, target="OT")
        assert s.columns == ["HUFL", "MULL", "OT"] and s.dates[0] == "2016-07-01 00:00:00"
        np.testing.assert_allclose(s.values, vals, atol=1e-9)


def test_truncated_gzip_names_the_file(tmp_path):
    _write_csv(tmp_path / "ett.csv", n=3000)
    packed = gzip.compress((tmp_path / "ett.csv").read_bytes())
    (tmp_path / "cut.csv.gz").write_bytes(packed[: len(packed) // 2])
    with pytest.raises(ValueError, match=r"data file '.*cut\.csv\.gz' is truncated or corrupt"):
        load_ett_csv(tmp_path / "cut.csv.gz")


def test_overflowing_statistics_name_the_column(tmp_path):
    """One 1e308 makes the train std infinite, which would z-score the column to zeros."""
    _write_csv(tmp_path / "ett.csv", n=60)
    lines = (tmp_path / "ett.csv").read_text().splitlines()
    date, hufl, mull, _ = lines[10].split(",")
    lines[10] = f"{date},{hufl},{mull},1e308"
    (tmp_path / "ett.csv").write_text("\n".join(lines) + "\n")
    s = load_ett_csv(tmp_path / "ett.csv")  # a finite value: the file itself is fine
    with pytest.raises(ValueError, match=r"column 'OT': its train-split statistics are not finite"):
        make_splits(s, lookback=8, horizon=4)


def test_splits_use_train_statistics_only(tmp_path):
    vals = _write_csv(tmp_path / "ett.csv", n=200)
    vals[140:] += 100.0  # a shift after the train split must not move the statistics
    lines = ["date,HUFL,MULL,OT"] + [
        f"{_hour(i)}," + ",".join(map(str, r)) for i, r in enumerate(vals)
    ]
    (tmp_path / "ett.csv").write_text("\n".join(lines))
    s = load_ett_csv(tmp_path / "ett.csv")
    sp = make_splits(s, lookback=8, horizon=4, split=(0.7, 0.1, 0.2), features="S")
    mean, std = vals[:140].mean(0), vals[:140].std(0)
    np.testing.assert_allclose(sp.mean, mean)
    np.testing.assert_allclose(sp.train, (vals[:140] - mean) / std)
    np.testing.assert_allclose(sp.val, (vals[140 - 8 : 160] - mean) / std)
    np.testing.assert_allclose(sp.test, (vals[160 - 8 :] - mean) / std)
    assert sp.in_idx == [2] and sp.target_idx == 2
    with pytest.raises(ValueError, match="too short"):
        make_splits(s, lookback=150, horizon=4)


def test_window_dataset_items():
    arr = np.arange(60, dtype=np.float64).reshape(20, 3)
    ds = WindowDataset(arr, lookback=5, horizon=3, stride=2, in_idx=[0, 2], target_idx=2)
    assert len(ds) == (20 - 5 - 3) // 2 + 1
    x, y = ds[3]
    np.testing.assert_array_equal(x.numpy(), arr[6:11][:, [0, 2]])
    np.testing.assert_array_equal(y.numpy(), arr[11:14][:, [2]])
    with pytest.raises(IndexError):
        ds[len(ds)]
    with pytest.raises(ValueError, match="shorter than one window"):
        WindowDataset(arr[:7], lookback=5, horizon=3)


EMBEDDED_COLUMNS = ["DEWP", "TEMP", "PRES", "Iws", "Is", "Ir", "wd_NE", "wd_NW", "wd_SE", "PM2.5"]


@pytest.fixture(scope="module")
def embedded():
    return load_embedded()


def test_embedded_dataset_columns_length_and_values(embedded):
    s = embedded
    assert embedded_path().is_file() and embedded_path().name.endswith(".csv.gz")
    assert s.columns == EMBEDDED_COLUMNS and s.target == "PM2.5"
    assert s.values.shape == (43800, 10)  # 1825 days x 24 h: 2010-01-02 .. 2014-12-31
    assert np.isfinite(s.values).all()  # no NaN (the source's missing PM2.5 are interpolated)
    col = dict(zip(s.columns, s.values.T))
    assert col["PM2.5"].min() >= 0.0 and col["PM2.5"].max() < 1000.0  # ug/m3
    assert -25.0 < col["TEMP"].min() < 0.0 < 30.0 < col["TEMP"].max() < 45.0  # deg C, Beijing
    assert 980.0 < col["PRES"].min() < col["PRES"].max() < 1050.0  # hPa
    assert (col["DEWP"] <= col["TEMP"] + 1.0).all()  # dew point <= air temperature (integer data)
    wind = s.values[:, 6:9]
    assert set(np.unique(wind)) == {0.0, 1.0} and (wind.sum(axis=1) <= 1).all()  # one-hot (+ calm)
    # a real weather series: strong daily cycle in temperature, PM2.5 persistent hour to hour
    for name, lag, floor in (("TEMP", 24, 0.8), ("PM2.5", 1, 0.9)):
        d = col[name] - col[name].mean()
        assert np.dot(d[:-lag], d[lag:]) / np.dot(d, d) > floor, name


def test_embedded_dataset_dates_strictly_hourly(embedded):
    dates = [datetime.strptime(d, "%Y-%m-%d %H:%M:%S") for d in embedded.dates]
    assert dates[0] == datetime(2010, 1, 2) and dates[-1] == datetime(2014, 12, 31, 23)
    steps = {b - a for a, b in itertools.pairwise(dates)}
    assert steps == {timedelta(hours=1)}  # strictly increasing, no gap, no duplicate


def test_embedded_default_config_splits_by_time(embedded):
    cfg = load_config("base.yaml")
    assert cfg.data.path is None and cfg.data.target == "PM2.5" and cfg.data.max_rows == 17520
    sp = build_splits(cfg)
    n, lb = 17520, cfg.data.lookback  # the last two years, 2013-01-01 00:00 .. 2014-12-31 23:00
    n_train, n_val = int(0.7 * n), int(0.1 * n)
    vals, dates = embedded.values[-n:], embedded.dates[-n:]
    assert dates[0] == "2013-01-01 00:00:00"
    assert sp.columns == EMBEDDED_COLUMNS and sp.target_idx == 9 and sp.in_idx == list(range(10))
    n_test = n - n_train - n_val
    assert (len(sp.train), len(sp.val), len(sp.test)) == (n_train, n_val + lb, n_test + lb)
    mean, std = vals[:n_train].mean(0), vals[:n_train].std(0)  # train split only
    np.testing.assert_allclose(sp.mean, mean)
    np.testing.assert_allclose(sp.test, (vals[n_train + n_val - lb :] - mean) / std)
    assert sp.test_dates[0] == dates[n_train + n_val - lb]
    # test targets come strictly after every train and val step
    assert sp.test_dates[lb] > dates[n_train + n_val - 1] > dates[n_train - 1]


def test_convert_tool_on_a_small_source():
    """tools/make_beijing_pm25.py: dates, dropped first day, interpolation, wind one-hot."""
    spec = importlib.util.spec_from_file_location("make_beijing_pm25", TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    head = "No,year,month,day,hour,pm2.5,DEWP,TEMP,PRES,cbwd,Iws,Is,Ir"
    src = [head, "1,2010,1,1,23,NA,-21,-11,1021,NW,1.79,0,0"]
    pm = ["10", "NA", "NA", "NA", "18", "20"]
    wd = ["NE", "NW", "SE", "cv", "NW", "NE"]
    for h, (v, w) in enumerate(zip(pm, wd)):
        src.append(f"{h + 2},2010,1,2,{h},{v},-16,-4,1020,{w},1.79,0,1")
    lines = tool.convert("\n".join(src).encode()).splitlines()
    assert lines[0] == "date," + ",".join(EMBEDDED_COLUMNS)
    assert len(lines) == 1 + 6 and lines[1].startswith("2010-01-02 00:00:00,-16,-4,1020,1.79,0,1,")
    rows = [line.split(",") for line in lines[1:]]
    assert [r[-1] for r in rows] == ["10", "12", "14", "16", "18", "20"]
    wind = [r[7:10] for r in rows[:4]]  # NE, NW, SE, cv
    assert wind == [["1", "0", "0"], ["0", "1", "0"], ["0", "0", "1"], ["0", "0", "0"]]
    with pytest.raises(ValueError, match="sha256"):
        tool.read_source(TOOL)
