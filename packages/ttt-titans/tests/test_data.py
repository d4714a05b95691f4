"""ETT CSV loader, splits and windows, checked against numpy computations written here."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from ttt_titans.data import (
    WindowDataset,
    embedded_path,
    load_embedded,
    load_ett_csv,
    make_splits,
)


def _write_csv(path, n=40, cols=("HUFL", "MULL", "OT"), seed=0):
    rng = np.random.default_rng(seed)
    vals = rng.normal(size=(n, len(cols)))
    lines = ["date," + ",".join(cols)]
    for i in range(n):
        lines.append(f"2016-07-01 {i % 24:02d}:00:00," + ",".join(f"{v:.6f}" for v in vals[i]))
    path.write_text("\n".join(lines) + "\n")
    return np.round(vals, 6)


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


def test_missing_date_column(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text("time,OT\n1,2.0\n")
    with pytest.raises(ValueError, match="no 'date' column"):
        load_ett_csv(p)


def test_non_numeric_value(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text("date,HUFL,OT\n2016-01-01,1.0,2.0\n2016-01-02,abc,3.0\n")
    with pytest.raises(ValueError, match=r"line 3, column 'HUFL': non-numeric value 'abc'"):
        load_ett_csv(p)


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


def test_ragged_row(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text("date,HUFL,OT\n2016-01-01,1.0,2.0\n2016-01-02,3.0\n")
    with pytest.raises(ValueError, match="line 3: 2 fields"):
        load_ett_csv(p)


def test_splits_use_train_statistics_only(tmp_path):
    vals = _write_csv(tmp_path / "ett.csv", n=200)
    vals[140:] += 100.0  # a shift after the train split must not move the statistics
    lines = ["date,HUFL,MULL,OT"] + [f"d{i}," + ",".join(map(str, r)) for i, r in enumerate(vals)]
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


def test_embedded_dataset_ships_with_package():
    assert embedded_path().is_file()
    s = load_embedded()
    assert s.columns == ["WorkDay", "Temperature", "Demand"]
    assert s.values.shape == (17520, 3)  # 365 days x 48 half-hours
    assert s.dates[0] == "2014-01-01 00:00:00" and s.dates[-1] == "2014-12-31 23:30:00"
    demand = s.values[:, 2]
    assert 2.0 < demand.min() < demand.max() < 10.0  # GW, Victoria
    # a real demand series has a strong daily cycle: lag-48 autocorrelation is high
    d = demand - demand.mean()
    assert np.dot(d[:-48], d[48:]) / np.dot(d, d) > 0.7
