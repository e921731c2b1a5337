"""Pass 1's moments: what one chunk's update reports and merges.

``Moments.update`` tells its caller whether the values held a NaN or an
infinity, so ``stats.compute`` learns the first file with a bad value from
the scan it makes anyway instead of re-checking every feature per chunk.
"""

from __future__ import annotations

import numpy as np

from mlaas.data.stats import Moments


def test_update_reports_non_finite_values_and_counts_them() -> None:
    m = Moments()
    assert m.update(np.array([1.0, 2.0, 3.0])) is False  # clean: nothing to report
    assert (m.nan, m.inf, m.count) == (0, 0, 3)
    assert m.update(np.array([np.nan, 4.0, -np.inf, np.inf, np.nan])) is True
    assert (m.nan, m.inf, m.count) == (2, 2, 4)
    assert m.update(np.array([np.nan])) is True  # nothing finite left: still reported
    assert m.update(np.zeros(0)) is False
    assert (m.nan, m.inf, m.count) == (3, 2, 4)
    assert (m.min, m.max, m.mean) == (1.0, 4.0, 2.5)
    np.testing.assert_allclose(m.std, np.std([1.0, 2.0, 3.0, 4.0]))
