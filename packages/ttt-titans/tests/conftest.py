"""Test settings of ttt-titans: the device switch (TTT_TEST_DEVICE=cuda runs the tests on the GPU)."""

from __future__ import annotations

import sys
from pathlib import Path

# The device switch (TTT_TEST_DEVICE=cuda runs these tests on the GPU): tools/ttt_test_device.py.
sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tools"))
from ttt_test_device import *  # noqa: F403

# Modules that only make sense on the CPU: skipped with this reason under TTT_TEST_DEVICE=cuda.
CPU_ONLY = {"test_data.py": "the ETT CSV loader and its windows are numpy arrays on the CPU"}
