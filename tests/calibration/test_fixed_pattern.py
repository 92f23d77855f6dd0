"""Per-frame fixed-pattern correction: camera maps, hot pixels, stripe suppression."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.fft

from livedecon.calibration._camera import CameraCalibration, CameraSummary, calibrate_camera
from livedecon.calibration._config import Camera, default_microscope
from livedecon.calibration._fixed_pattern import (
    OffsetGainCorrection,
    StripeFilter,
    _LineNotch,
    suppress_stripes,
)
from livedecon.calibration._forward_model import ForwardModel
from livedecon.calibration._metrics import psnr, ssim

EXPOSURE_MS = 50.0


def _model(size: int, stripe_adu: float = 0.0, noise_seed: int = 5, **camera) -> ForwardModel:
    scope = default_microscope()
    fields = scope.camera.model_dump() | {"width_px": size, "height_px": size} | camera
    sample = scope.sample.model_copy(update={"stripe_adu": stripe_adu})
    config = scope.model_copy(update={"camera": Camera(**fields), "sample": sample})
    return ForwardModel(config, noise_seed=noise_seed)


@pytest.fixture(scope="module")
def scmos():
    model = _model(
        64,
        offset_spread_adu=3.0,
        read_noise_spread=0.3,
        gain_spread=0.02,
        hot_pixel_fraction=0.003,
        hot_pixel_e_per_s=2000.0,
    )
    darks = np.stack([model.dark(EXPOSURE_MS) for _ in range(50)])
    levels = (100, 400, 1500, 5000, 15000, 30000)
    flats = [np.stack([model.flat(e, EXPOSURE_MS) for _ in range(20)]) for e in levels]
    return model, calibrate_camera(darks, flats, exposure_ms=EXPOSURE_MS)


@pytest.mark.parametrize("level_e", [0.0, 500.0, 5000.0])
def test_offset_gain_correction_removes_fixed_pattern(scmos, level_e):
    """Spatial std of a 50-frame temporal mean: the fixed pattern goes, down to the noise of
    the frames and of the calibration maps."""
    model, cal = scmos
    frames = np.stack(
        [
            model.flat(level_e, EXPOSURE_MS) if level_e else model.dark(EXPOSURE_MS)
            for _ in range(50)
        ]
    )
    corrected = OffsetGainCorrection(cal)(frames)
    assert corrected.dtype == np.float32
    before, after = frames.mean(axis=0).std(), corrected.mean(axis=0).std()
    # the floor: this mean's temporal noise plus that of the offset and gain maps
    s = cal.summary
    temporal = frames.astype(float).var(axis=0, ddof=1).mean() / 50
    maps = cal.read_variance_adu2.mean() / s.dark_frames
    maps += (s.relative_gain_noise * level_e / s.gain_e_per_adu) ** 2
    floor = np.sqrt(temporal + maps)
    print(
        f"\n{level_e:g} e-: fixed pattern std {before:.2f} -> {after:.2f} ADU (floor {floor:.2f})"
    )
    assert after < 1.15 * floor
    assert before > 3 * after
    # the output is an ideal camera's counts: global offset and gain still convert them
    electrons = (corrected - s.offset_adu) * s.gain_e_per_adu
    assert electrons.mean() == pytest.approx(level_e, abs=0.02 * level_e + 0.2)


def test_hot_pixels_become_the_median_of_their_neighbours():
    hot = np.zeros((8, 10), dtype=bool)
    hot[0, 0] = hot[4, 4] = hot[4, 5] = True  # a corner and a pair
    hot[6:9, 6:9] = True  # a cluster: its centre has no good pixel in the 3 x 3 ring
    summary = _summary(hot.shape)
    cal = CameraCalibration(
        np.full(hot.shape, 100.0, np.float32), np.ones(hot.shape, np.float32), hot, None, summary
    )
    frame = np.random.default_rng(0).integers(100, 200, hot.shape).astype(np.uint16)
    frame[hot] = 60000
    out = OffsetGainCorrection(cal)(np.stack([frame, frame]))
    assert np.array_equal(out[0], out[1])
    good = frame.astype(np.float32)
    assert out[0][~hot].tolist() == good[~hot].tolist()
    assert out[0, 0, 0] == np.median(good[[0, 1, 1], [1, 0, 1]])
    pair = [(3, 3), (3, 4), (3, 5), (4, 3), (5, 3), (5, 4), (5, 5)]  # (4, 5) is hot
    assert out[0, 4, 4] == np.median([good[p] for p in pair])
    # (7, 7): the next ring out, two pixels away, inside the frame and not hot
    ring = [
        good[y, x]
        for y in range(5, 8)
        for x in range(5, 10)
        if not hot[y, x] and max(abs(y - 7), abs(x - 7)) == 2
    ]
    assert out[0, 7, 7] == np.float32(np.median(ring))
    assert out[0][hot].max() < 200


def _summary(shape):
    return CameraSummary(
        kind="ccd",
        shape=shape,
        dark_frames=10,
        flat_frames=[10, 10],
        offset_adu=100.0,
        gain_e_per_adu=1.0,
        gain_rel_error=0.01,
        read_noise_e=1.0,
        read_noise_rms_e=1.0,
        excess_noise_factor_sq=1.0,
        offset_spread_adu=0.0,
        read_noise_spread=0.0,
        relative_gain_spread=0.0,
        relative_gain_noise=0.01,
        hot_pixels=0,
        hot_pixel_threshold=6.0,
        ptc=[],
        ptc_max_rel_residual=0.0,
    )


def test_ccd_correction_uses_the_global_offset(scmos):
    _, cal = scmos
    frame = np.full(cal.summary.shape, 150, np.uint16)
    ccd = CameraCalibration(
        cal.offset_adu,
        cal.read_variance_adu2,
        np.zeros_like(cal.hot_pixels),
        None,
        cal.summary.model_copy(update={"kind": "ccd"}),
    )
    np.testing.assert_array_equal(OffsetGainCorrection(ccd)(frame), 150.0)
    with pytest.raises(ValueError, match="the calibration is"):
        OffsetGainCorrection(ccd)(frame[:, :-1])


# -- stripes ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def striped_specimen():
    """The same specimen frame (same noise) with and without sCMOS column stripes."""
    clean = _model(256).acquire(0.0, 0.0, 20)
    striped = _model(256, stripe_adu=8.0).acquire(0.0, 0.0, 20)
    return clean, striped


def _column_stripe_rms(frame, reference):
    return float(np.sqrt(np.mean((frame - reference).mean(axis=0) ** 2)))


def test_stripe_suppression_removes_column_stripes_and_keeps_the_specimen(striped_specimen):
    clean, striped = striped_specimen
    reference = clean.counts.astype(np.float64)
    raw = striped.counts.astype(np.float64)
    out = suppress_stripes(striped.counts)
    assert out.dtype == np.float32
    before, after = _column_stripe_rms(raw, reference), _column_stripe_rms(out, reference)
    # the filter's own effect on a stripe-free frame: what it takes from the specimen
    untouched = suppress_stripes(clean.counts)
    print(
        f"\ncolumn stripes {before:.2f} -> {after:.2f} ADU rms ({before / after:.1f}x);"
        f" PSNR {psnr(raw, reference):.1f} -> {psnr(out, reference):.1f} dB;"
        f" SSIM {ssim(raw, reference):.3f} -> {ssim(out, reference):.3f};"
        f" stripe-free frame through the filter: {psnr(untouched, reference):.1f} dB"
    )
    assert before / after > 4
    assert out.mean(dtype=np.float64) == pytest.approx(raw.mean(), rel=1e-6)
    assert psnr(out, reference) > psnr(raw, reference) + 10
    assert ssim(out, reference) > 0.99
    assert psnr(untouched, reference) > 38
    # the structure is still there: as close to the noise-free image as the stripe-free frame
    expected = clean.expected_e.ravel()
    assert (
        np.corrcoef(out.ravel(), expected)[0, 1]
        > np.corrcoef(reference.ravel(), expected)[0, 1] - 0.01
    )


def test_stripes_that_change_every_frame():
    """sCMOS column noise is new in every frame: no offset map removes it, the filter does.
    The same frames without it (same seeds, same shot and read noise) are the reference."""
    clean = [_model(256, noise_seed=s).acquire(0.0, 0.0, 20).counts for s in (5, 6)]
    noisy = [
        _model(256, noise_seed=s, column_noise_adu=4.0).acquire(0.0, 0.0, 20).counts for s in (5, 6)
    ]
    frames, reference = np.stack(noisy).astype(np.float64), np.stack(clean).astype(np.float64)
    out = StripeFilter(frames.shape[-2:])(frames)  # a stack, plane by plane
    before = np.mean([_column_stripe_rms(f, r) for f, r in zip(frames, reference, strict=True)])
    after = np.mean([_column_stripe_rms(f, r) for f, r in zip(out, reference, strict=True)])
    print(f"\nper-frame column noise {before:.2f} -> {after:.2f} ADU rms ({before / after:.1f}x)")
    assert before / after > 3
    means = out.mean(axis=(1, 2), dtype=np.float64)
    np.testing.assert_allclose(means, frames.mean(axis=(1, 2)), rtol=1e-6)


def test_row_stripes_need_rows():
    rng = np.random.default_rng(1)
    base = rng.normal(200, 5, (96, 160))
    rows = rng.normal(0, 6, (96, 1))
    frame = base + rows
    only_columns = StripeFilter(frame.shape)(frame)
    both = StripeFilter(frame.shape, rows=True)(frame)
    rms = lambda f: np.sqrt(np.mean((f - base).mean(axis=1) ** 2))  # noqa: E731
    assert rms(only_columns) == pytest.approx(rms(frame), rel=0.05)
    assert rms(both) < rms(frame) / 4


@pytest.mark.parametrize("shape", [(64, 64), (37, 101), (130, 48)])
@pytest.mark.parametrize(("notch_width", "dc_radius"), [(0.002, 0.01), (0.05, 0.03), (0.0, 0.0)])
def test_low_rank_filter_equals_the_full_transform(shape, notch_width, dc_radius):
    """The band-limited implementation is the 2D DCT notch, exactly; the mean never moves."""
    rng = np.random.default_rng(2)
    frame = (
        rng.normal(100, 10, shape) + rng.normal(0, 5, shape[1]) + rng.normal(0, 3, (shape[0], 1))
    )
    out = StripeFilter(shape, rows=True, notch_width=notch_width, dc_radius=dc_radius)(frame)
    spectrum = scipy.fft.dctn(frame, norm="ortho")
    for axis in (0, 1):
        gain = _LineNotch(shape, axis, notch_width, dc_radius, 1.0).gain_minus_one
        full = np.zeros(shape)
        full[: gain.shape[0], : gain.shape[1]] = gain
        spectrum *= 1 + full
    np.testing.assert_allclose(out, scipy.fft.idctn(spectrum, norm="ortho"), atol=2e-3)
    assert out.mean(dtype=np.float64) == pytest.approx(frame.mean(), rel=1e-6)


def test_stacks_are_filtered_plane_by_plane():
    rng = np.random.default_rng(3)
    stack = rng.normal(100, 10, (3, 2, 40, 50)).astype(np.float32)
    stripe_filter = StripeFilter((40, 50))
    out = stripe_filter(stack)
    assert out.shape == stack.shape
    for index in np.ndindex(3, 2):
        np.testing.assert_array_equal(out[index], stripe_filter(stack[index]))
    np.testing.assert_array_equal(stack, stack.copy())  # input untouched


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"notch_width": -0.1}, "notch_width"),
        ({"strength": 2.0}, "strength"),
        ({"dc_radius": 0.7}, "dc_radius"),
    ],
)
def test_bad_filter_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        StripeFilter((32, 32), **kwargs)
    with pytest.raises(ValueError, match="the filter is for"):
        StripeFilter((32, 32))(np.zeros((32, 31)))
