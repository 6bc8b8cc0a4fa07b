"""egovlp_deploy.preprocess (the C++ extension) against the torch reference `transforms.eval_transform`.

Parity: float32 max abs error <= 1e-5 on random frames of random sizes (hypothesis), float16 within half an ulp of
the float32 reference; layouts, out=, the batch entry point, strided inputs, thread counts, and every bad input
raising a clear Python exception instead of crashing.
"""

from __future__ import annotations

import concurrent.futures
import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from egovlp_deploy import preprocess, transforms
from egovlp_deploy.preprocess import ClipSpec, preprocess_clip, preprocess_clips
from egovlp_deploy.transforms import eval_transform

# A build without the extension skips; the sanitizer run (which sets EGOVLP_EXPECT_SANITIZED) must never skip.
pytestmark = pytest.mark.skipif(
    not preprocess.available() and os.environ.get("EGOVLP_EXPECT_SANITIZED") != "1",
    reason="the C++ extension egovlp_deploy._C is not built",
)

FP32_ATOL = 1e-5  # the bar; measured worst case about 2e-6 (float rounding of a different summation order)
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def frames_of(t, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (t, h, w, 3), dtype=torch.uint8, generator=g)


def max_err(a, b):
    return (a.float() - b.float()).abs().max().item()


# Frame sides: mostly small (fast reference), some around the 256 crop, a few long ones; 1 and 2 included, as
# the reference accepts them (it upsamples a 1x1 frame to 256x256).
sides = st.one_of(st.integers(1, 16), st.integers(17, 300), st.sampled_from([224, 255, 256, 257, 341, 480, 640]))


def _bounded_aspect(hw, limit=12):
    # The reference widens the whole short-side-resized frame to float: a 1 x 300 frame becomes 256 x 76800 x 3
    # floats. Aspect ratios past `limit` only cost reference time; one fixed test covers a 1 x 40 frame.
    h, w = hw
    w = min(w, limit * h)
    return min(h, limit * w), w


frame_hw = st.tuples(sides, sides).map(_bounded_aspect)
out_sizes = st.one_of(st.just(224), st.integers(1, 240))


# -- float32 parity -------------------------------------------------------------------------------------------
@SETTINGS
@given(
    t=st.integers(1, 3),
    hw=frame_hw,
    size=out_sizes,
    variant=st.sampled_from(transforms.VARIANTS),
    seed=st.integers(0, 2**16),
)
def test_fp32_matches_reference(t, hw, size, variant, seed):
    frames = frames_of(t, *hw, seed)
    ref = eval_transform(frames, size, variant)
    got = preprocess_clip(frames, size, variant)
    assert got.shape == ref.shape and got.dtype == torch.float32 and got.is_contiguous()
    assert max_err(got, ref) <= FP32_ATOL


@pytest.mark.parametrize("hw", [(1080, 1920), (720, 1280), (1920, 1080), (256, 455), (1, 1), (1, 40), (3, 2)])
@pytest.mark.parametrize("variant", transforms.VARIANTS)
def test_fp32_matches_reference_at_video_sizes(hw, variant):
    frames = frames_of(2, *hw, seed=hw[0])
    assert max_err(preprocess_clip(frames, 224, variant), eval_transform(frames, 224, variant)) <= FP32_ATOL


def test_parity_holds_with_single_threaded_torch():
    # With one thread (or an output of h + w <= 128) torch interpolates with its channels-last kernel instead of
    # the generic one: a different summation, the same index arithmetic.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for hw, size in [((240, 320), 224), ((97, 61), 48), ((480, 640), 56)]:
            frames = frames_of(2, *hw)
            for variant in transforms.VARIANTS:
                ref = eval_transform(frames, size, variant)
                assert max_err(preprocess_clip(frames, size, variant), ref) <= FP32_ATOL
    finally:
        torch.set_num_threads(before)


@SETTINGS
@given(hw=frame_hw, data=st.data())
def test_custom_spec_matches_reference_blocks(hw, data):
    short_side = data.draw(st.integers(1, 300))
    crop = data.draw(st.integers(1, short_side))
    size = data.draw(st.integers(1, 240))
    spec = ClipSpec(
        size=size, crop=crop, short_side=short_side, pixel_scale=1 / 255, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3)
    )
    frames = frames_of(2, *hw, seed=hw[0] * 1000 + hw[1])
    clip = transforms.to_float_clip(frames, spec.pixel_scale)
    clip = transforms.center_crop(transforms.resize_short_side(clip, short_side), crop)
    ref = transforms.normalize(transforms.resize(clip, size, size), spec.mean, spec.std)
    assert max_err(preprocess_clip(frames, spec=spec), ref) <= FP32_ATOL


# -- float16, layouts, out=, threads ----------------------------------------------------------------------------
@SETTINGS
@given(hw=frame_hw, size=out_sizes, variant=st.sampled_from(transforms.VARIANTS))
def test_fp16_is_the_fp32_result_rounded(hw, size, variant):
    frames = frames_of(2, *hw, seed=sum(hw))
    ref = eval_transform(frames, size, variant)
    got32 = preprocess_clip(frames, size, variant)
    got16 = preprocess_clip(frames, size, variant, dtype=torch.float16)
    assert got16.dtype == torch.float16
    assert torch.equal(got16, got32.half())  # exactly torch's rounding of our float32 result (F16C or software)
    # against the float32 reference: half a float16 ulp of the value, plus the float32 tolerance
    ulp = torch.finfo(torch.float16).eps * torch.exp2(torch.floor(torch.log2(ref.abs().clamp(min=2.0**-14))))
    assert ((got16.float() - ref).abs() <= ulp / 2 + FP32_ATOL).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cthw_layout_is_the_tchw_result_transposed(dtype):
    frames = frames_of(5, 123, 301)
    tchw = preprocess_clip(frames, 64, dtype=dtype)
    cthw = preprocess_clip(frames, 64, dtype=dtype, layout="CTHW")
    assert cthw.shape == (3, 5, 64, 64) and cthw.is_contiguous()
    assert torch.equal(cthw, tchw.permute(1, 0, 2, 3))


def test_out_buffer_is_filled_and_returned():
    frames = frames_of(3, 90, 160)
    out = torch.full((3, 3, 224, 224), float("nan"))
    result = preprocess_clip(frames, out=out)
    assert result is out and torch.equal(out, preprocess_clip(frames))
    staging = torch.empty(2, 3, 3, 32, 32, dtype=torch.float16)  # a slot of a larger (e.g. pinned) buffer
    preprocess_clip(frames, 32, dtype=torch.float16, layout="CTHW", out=staging[1])
    assert torch.equal(staging[1], preprocess_clip(frames, 32, dtype=torch.float16, layout="CTHW"))


@pytest.mark.parametrize("threads", [1, 2, 3, 7, 64])
def test_results_do_not_depend_on_thread_count(threads):
    # each output value is computed by the same arithmetic whichever band or thread computes it
    frames = frames_of(2, 300, 533)
    assert torch.equal(preprocess_clip(frames, num_threads=threads), preprocess_clip(frames, num_threads=1))


def test_concurrent_python_threads():
    clips = [frames_of(2, 100 + 13 * i, 200 - 7 * i, seed=i) for i in range(6)]
    expected = [preprocess_clip(c, 96) for c in clips]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda c: preprocess_clip(c, 96, num_threads=2), clips))
    assert all(torch.equal(a, b) for a, b in zip(results, expected))


# -- batch entry point ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", preprocess.LAYOUTS)
def test_batch_equals_clip_by_clip(layout):
    clips = [frames_of(4, 120, 200, 1), frames_of(4, 360, 640, 2), frames_of(4, 33, 17, 3)]
    batch = preprocess_clips(clips, 96, "epic", layout=layout)
    assert batch.shape == (3, *preprocess_clip(clips[0], 96, "epic", layout=layout).shape)
    for i, clip in enumerate(clips):
        assert torch.equal(batch[i], preprocess_clip(clip, 96, "epic", layout=layout))


def test_batch_accepts_a_stacked_tensor_and_numpy_and_out():
    stack = torch.stack([frames_of(2, 50, 70, s) for s in range(3)])  # (B, T, H, W, 3)
    out = torch.empty(3, 2, 3, 40, 40, dtype=torch.float16)
    assert preprocess_clips(stack, 40, dtype=torch.float16, out=out) is out
    assert torch.equal(out, preprocess_clips([c.numpy() for c in stack], 40, dtype=torch.float16))


def test_batch_rejects_mismatched_and_empty_input():
    with pytest.raises(ValueError, match="same number of frames"):
        preprocess_clips([frames_of(2, 8, 8), frames_of(3, 8, 8)])
    with pytest.raises(ValueError, match="empty"):
        preprocess_clips([])
    with pytest.raises(TypeError, match=r"clips\[1\] must be uint8"):
        preprocess_clips([frames_of(2, 8, 8), frames_of(2, 8, 8).float()])
    with pytest.raises(TypeError, match="sequence"):
        preprocess_clips(frames_of(2, 8, 8))


# -- strided inputs (read in place, no copy) ----------------------------------------------------------------------
def strided_views():
    base = frames_of(4, 181, 263, seed=5)
    arr = base.numpy()
    return {
        "row/col slices": base[:, 3::2, 1::3],
        "transposed frames": base.permute(0, 2, 1, 3),
        "expanded last frame": base[-1:].expand(6, -1, -1, -1),  # how decoding.py pads short clips
        "every other frame": base[::2],
        "numpy BGR->RGB view": arr[..., ::-1],
        "numpy flipped rows": arr[:, ::-1],
        "channel-planar memory": base.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1),
    }


@pytest.mark.parametrize("name", list(strided_views()))
def test_strided_inputs_match_their_contiguous_copy(name):
    view = strided_views()[name]
    dense = torch.from_numpy(np.ascontiguousarray(view)) if isinstance(view, np.ndarray) else view.contiguous()
    assert torch.equal(preprocess_clip(view, 80), preprocess_clip(dense, 80))
    assert max_err(preprocess_clip(view, 80), eval_transform(dense, 80)) <= FP32_ATOL


def test_dlpack_input():
    class OnlyDLPack:  # any framework's tensor: only the DLPack protocol
        def __init__(self, t):
            self._t = t

        def __dlpack__(self, **kwargs):
            return self._t.__dlpack__(**kwargs)

        def __dlpack_device__(self):
            return self._t.__dlpack_device__()

    frames = frames_of(2, 40, 60)
    assert torch.equal(preprocess_clip(OnlyDLPack(frames), 32), preprocess_clip(frames, 32))


# -- bad input: clear exceptions, never a crash ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "frames, error, match",
    [
        (torch.zeros(8, 8, 3, dtype=torch.uint8), ValueError, "4 dimensions"),
        (torch.zeros(1, 2, 8, 8, 3, dtype=torch.uint8), ValueError, "4 dimensions"),
        (torch.zeros(2, 8, 8, 4, dtype=torch.uint8), ValueError, "3 channels"),
        (torch.zeros(2, 3, 8, 8, dtype=torch.uint8), ValueError, "3 channels"),  # (T, C, H, W) by mistake
        (torch.zeros(2, 8, 8, 3), TypeError, "uint8"),
        (torch.zeros(2, 8, 8, 3, dtype=torch.bool), TypeError, "uint8"),
        (np.zeros((2, 8, 8, 3), np.int16), TypeError, "uint8"),
        (torch.zeros(0, 8, 8, 3, dtype=torch.uint8), ValueError, "empty clip"),
        (torch.zeros(2, 0, 8, 3, dtype=torch.uint8), ValueError, "zero-size"),
        (torch.zeros(2, 8, 0, 3, dtype=torch.uint8), ValueError, "zero-size"),
        ([[1, 2, 3]], TypeError, "torch.Tensor, a numpy array"),
    ],
)
def test_bad_frames_raise(frames, error, match):
    with pytest.raises(error, match=match):
        preprocess_clip(frames)


def test_bad_arguments_raise():
    frames = frames_of(2, 20, 30)
    cases = [
        (dict(variant="kinetics"), ValueError, "variant"),
        (dict(size=0), ValueError, "size must be a positive int"),
        (dict(spec=ClipSpec(224, 300, 256, 1 / 255, (0, 0, 0), (1, 1, 1))), ValueError, "cannot center-crop 300x300"),
        (dict(spec=ClipSpec(224, 224, 256, 1 / 255, (0, 0, 0), (1, 0, 1))), ValueError, "std"),
        (dict(layout="NCHW"), ValueError, "layout"),
        (dict(dtype=torch.bfloat16), TypeError, "float32 or torch.float16"),
        (dict(num_threads=0), ValueError, "num_threads"),
        (dict(out=torch.empty(2, 3, 224, 225)), ValueError, "shape"),
        (dict(out=torch.empty(2, 3, 224, 224, dtype=torch.float16)), TypeError, "dtype"),
        (dict(out=torch.empty(2, 224, 224, 3).permute(0, 3, 1, 2)), ValueError, "contiguous"),
        (dict(out=torch.empty(2, 3, 224, 224, requires_grad=True)), ValueError, "grad"),
        (dict(out=np.empty((2, 3, 224, 224), np.float32)), TypeError, "torch.Tensor"),
    ]
    for kwargs, error, match in cases:
        with pytest.raises(error, match=match):
            preprocess_clip(frames, **kwargs)


@pytest.mark.parametrize(
    "field, spec, shown",
    [
        ("mean", ClipSpec(32, 32, 32, 1 / 255, (float("nan"), 0.4, 0.3), (0.2, 0.2, 0.2)), r"\(nan, 0.4, 0.3\)"),
        ("std", ClipSpec(32, 32, 32, 1 / 255, (0.5, 0.4, 0.3), (0.2, float("nan"), 0.2)), r"\(0.2, nan, 0.2\)"),
        ("std", ClipSpec(32, 32, 32, 1 / 255, (0.5, 0.4, 0.3), (0.2, 0.2, float("inf"))), r"\(0.2, 0.2, inf\)"),
        ("pixel_scale", ClipSpec(32, 32, 32, float("nan"), (0.5, 0.4, 0.3), (0.2, 0.2, 0.2)), "nan"),
    ],
)
def test_non_finite_normalisation_names_the_field(field, spec, shown):
    # The extension sees only the folded scale and bias (and blamed a zero std for a NaN mean): the wrapper names
    # the value that is wrong.
    with pytest.raises(ValueError, match=f"^{field} must be finite, got {shown}$"):
        preprocess_clip(frames_of(1, 8, 8), spec=spec)


@pytest.mark.parametrize("size", [np.int64(40), np.int32(33), np.uint16(24)])
def test_numpy_integer_sizes_are_accepted_like_the_reference(size):
    # eval_transform takes a numpy integer size (from a config array); eval_clip must not fail on it only when the
    # extension is built
    frames = frames_of(2, 50, 70)
    ref = eval_transform(frames, size)
    assert max_err(preprocess.eval_clip(frames, size), ref) <= FP32_ATOL
    assert preprocess_clips([frames], size, layout="CTHW").shape == (1, 3, 2, int(size), int(size))
    with pytest.raises(ValueError, match="size must be a positive int"):
        preprocess_clip(frames, np.bool_(True))


def test_extension_checks_its_own_arguments():
    # The extension is reachable without the wrapper: it must refuse bad buffers itself rather than read or
    # write out of bounds.
    from egovlp_deploy import _C

    spec = dict(short_side=256, crop=256, size=8, pixel_scale=1.0, mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0])
    frames = np.zeros((2, 8, 8, 3), np.uint8)
    out = np.zeros((2, 3, 8, 8), np.float32)
    _C.preprocess(frames, out, **spec)
    bad = [
        (lambda: _C.preprocess(np.zeros((8, 8, 3), np.uint8), out, **spec), ValueError, "4 dimensions"),
        (lambda: _C.preprocess(frames.astype(np.float32), out, **spec), TypeError, "uint8"),
        (lambda: _C.preprocess(np.zeros((2, 8, 8, 2), np.uint8), out, **spec), ValueError, "3 channels"),
        (lambda: _C.preprocess(np.zeros((0, 8, 8, 3), np.uint8), out[:0], **spec), ValueError, "empty"),
        (lambda: _C.preprocess(frames, np.zeros((2, 3, 8, 9), np.float32), **spec), ValueError, "shape"),
        (lambda: _C.preprocess(frames, np.zeros((2, 3, 8, 8), np.float64), **spec), TypeError, "float32 or float16"),
        (
            lambda: _C.preprocess(frames, np.zeros((2, 3, 8, 16), np.float32)[..., ::2], **spec),
            ValueError,
            "C-contiguous",
        ),
        (lambda: _C.preprocess(frames, np.broadcast_to(np.float32(0), (2, 3, 8, 8)), **spec), ValueError, "writable"),
        (lambda: _C.preprocess(frames, out, **{**spec, "crop": 300}), ValueError, "center-crop"),
        (lambda: _C.preprocess(frames, out, **{**spec, "size": -1}), ValueError, "positive"),
        (lambda: _C.preprocess(frames, out, **{**spec, "size": 10**6}), ValueError, "at most"),
        (lambda: _C.preprocess(frames, out, **{**spec, "std": [1.0, 0.0, 1.0]}), ValueError, "finite"),
        (lambda: _C.preprocess(frames, out, **spec, layout="HWC"), ValueError, "layout"),
        (
            lambda: _C.preprocess_batch([frames, "x"], np.zeros((2, 2, 3, 8, 8), np.float32), **spec),
            TypeError,
            "buffer protocol",
        ),
        (lambda: _C.preprocess_batch([], np.zeros((0, 2, 3, 8, 8), np.float32), **spec), ValueError, "empty"),
    ]
    for call, error, match in bad:
        with pytest.raises(error, match=match):
            call()


def test_out_overlapping_the_frames_is_refused():
    from egovlp_deploy import _C

    memory = np.zeros(4 * 3 * 8 * 8 * 4, np.uint8)
    frames = memory[: 2 * 8 * 8 * 3].reshape(2, 8, 8, 3)
    out = memory.view(np.float32)[: 2 * 3 * 8 * 8].reshape(2, 3, 8, 8)
    with pytest.raises(ValueError, match="overlaps"):
        _C.preprocess(frames, out, short_side=8, crop=8, size=8, pixel_scale=1.0, mean=[0.0] * 3, std=[1.0] * 3)


def test_the_expected_build_is_loaded():
    # scripts/sanitize_preprocess.sh sets EGOVLP_EXPECT_SANITIZED=1: its run must test the ASan/UBSan build, and a
    # normal run must not pick one up.
    from egovlp_deploy import _C

    sanitized = _C.build_info()["sanitizers"] != "none"
    assert sanitized == (os.environ.get("EGOVLP_EXPECT_SANITIZED") == "1")


# -- float16 rounding routine -----------------------------------------------------------------------------------
def test_software_float16_rounding_matches_numpy():
    from egovlp_deploy import _C

    special = np.array(
        [
            0.0,
            -0.0,
            1.0,
            -2.5,
            65504.0,
            65519.99,
            65520.0,
            1e6,
            -1e6,
            np.inf,
            -np.inf,
            2.0**-14,
            2.0**-24,
            2.0**-25,
            3 * 2.0**-26,
            2.0**-26,
            1e-10,
            2.0**-14 - 2.0**-25,
            1 + 2.0**-11,
            1 + 3 * 2.0**-11,
            2049.0,
            2051.0,
        ],
        np.float32,
    )
    rng = np.random.default_rng(0)
    randoms = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    normals = (rng.standard_normal(50_000) * 3).astype(np.float32)
    values = np.concatenate([special, randoms[np.isfinite(randoms)], normals])
    bits = np.frombuffer(_C._float_to_half_bits(values), np.uint16)
    with np.errstate(over="ignore"):  # numpy warns on the values that round to infinity, which we test
        expected = values.astype(np.float16).view(np.uint16)
    np.testing.assert_array_equal(bits, expected)
    nan_bits = np.frombuffer(_C._float_to_half_bits(np.array([np.nan], np.float32)), np.uint16)
    assert np.isnan(nan_bits.view(np.float16)).all()


# -- dispatch: the data pipeline's eval path ----------------------------------------------------------------------
def test_eval_clip_uses_the_extension_and_falls_back_to_the_reference(monkeypatch):
    from egovlp_deploy.data.egoclip import clip_tensor

    frames = frames_of(3, 144, 176)
    fast = preprocess.eval_clip(frames, 224)
    assert torch.equal(fast, preprocess_clip(frames, 224))
    assert max_err(fast, eval_transform(frames, 224)) <= FP32_ATOL
    video, failed = clip_tensor(frames, 4, 224)
    assert failed == 0 and torch.equal(video[:3], fast) and not video[3].any()

    monkeypatch.setattr(preprocess, "_C", None)  # a build without the extension
    assert not preprocess.available()
    assert torch.equal(preprocess.eval_clip(frames, 224, "epic"), eval_transform(frames, 224, "epic"))
    with pytest.raises(RuntimeError, match="not built"):
        preprocess_clip(frames)
