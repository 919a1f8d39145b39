import math

import numpy as np
import pytest

from milpasses.simulator import psnr


def test_psnr_is_peak_over_rmse_in_decibels():
    reference = np.array([4.0, -2.0, 0.0, 1.0])
    actual = reference + np.array([0.04, -0.04, 0.04, -0.04])
    assert psnr(reference, actual) == pytest.approx(20 * math.log10(4.0 / 0.04))


def test_psnr_of_identical_arrays_is_infinite():
    assert psnr(np.ones(3), np.ones(3)) == math.inf


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nonfinite_output_never_passes(bad):
    assert psnr(np.ones(3), np.array([1.0, bad, 1.0])) == -math.inf


def test_shapes_must_match():
    with pytest.raises(ValueError, match="equal shapes"):
        psnr(np.ones(3), np.ones(4))
