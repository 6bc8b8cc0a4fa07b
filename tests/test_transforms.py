"""egovlp_deploy.transforms against hand-computed torchvision-0.14 semantics: bilinear values without antialias,
Resize(int) sizes, CenterCrop offsets (round half to even), normalisation numbers, RandomResizedCrop bounds and
fallback, one crop/flip per clip, determinism, and the lax-mode black clip."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from egovlp_deploy import transforms as T
from egovlp_deploy.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    black_clip,
    center_crop,
    eval_transform,
    random_resized_crop_params,
    resize,
    short_side_size,
    train_transform,
)


def random_frames(num_frames=3, height=48, width=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (num_frames, height, width, 3), dtype=torch.uint8, generator=g)


def column_ramp(num_frames=2, height=40, width=60):
    """uint8 frames whose value is 4 x column index: increasing left to right."""
    ramp = (torch.arange(width) * 4).clamp(max=255).to(torch.uint8)
    return ramp.view(1, 1, width, 1).expand(num_frames, height, width, 3).contiguous()


# -- resize / crop semantics ------------------------------------------------------------------------------------
def test_bilinear_2x2_to_4x4_hand_computed():
    # align_corners=False: source x = (dst + 0.5) / 2 - 0.5 = -0.25, 0.25, 0.75, 1.25 -> clamped weights
    # 0, 0.25, 0.75, 1 along each axis; value = 2 * wy + wx for the input [[0, 1], [2, 3]].
    img = torch.tensor([[0.0, 1.0], [2.0, 3.0]]).view(1, 1, 2, 2)
    expected = torch.tensor(
        [[0.0, 0.25, 0.75, 1.0], [0.5, 0.75, 1.25, 1.5], [1.5, 1.75, 2.25, 2.5], [2.0, 2.25, 2.75, 3.0]]
    )
    torch.testing.assert_close(resize(img, 4, 4)[0, 0], expected, rtol=0, atol=1e-6)


def test_downscale_has_no_antialias():
    # 6 -> 2 columns: source x = (d + 0.5) * 3 - 0.5 = 1, 4 -> exactly pixels 1 and 4 (both 9); an antialiased
    # resize would average in the zeros around them.
    row = torch.tensor([0.0, 9.0, 0.0, 0.0, 9.0, 0.0]).view(1, 1, 1, 6)
    torch.testing.assert_close(resize(row, 1, 2)[0, 0, 0], torch.tensor([9.0, 9.0]), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "hw, size, expected",
    [
        ((240, 320), 256, (256, 341)),  # int(256 * 320 / 240) = int(341.33)
        ((320, 240), 256, (341, 256)),  # portrait: the width is the short side
        ((360, 640), 256, (256, 455)),
        ((240, 320), 224, (224, 298)),  # int(298.67): truncation, not rounding
        ((300, 300), 256, (256, 256)),
    ],
)
def test_short_side_size_matches_torchvision_resize_int(hw, size, expected):
    assert short_side_size(*hw, size) == expected


@pytest.mark.parametrize("width, left", [(256, 0), (259, 2), (261, 2), (341, 42), (343, 44)])
def test_center_crop_offset_rounds_half_to_even(width, left):
    # (259-256)/2 = 1.5 -> 2; 2.5 -> 2; 42.5 -> 42; 43.5 -> 44 (Python round, as torchvision)
    img = torch.arange(width, dtype=torch.float32).view(1, 1, 1, width).expand(1, 1, 260, width)
    out = center_crop(img, 256)
    assert out.shape[-2:] == (256, 256) and out[0, 0, 0, 0].item() == left
    assert out[0, 0, 0, -1].item() == left + 255


def test_center_crop_rejects_a_small_image():
    with pytest.raises(ValueError, match="center-crop"):
        center_crop(torch.zeros(1, 3, 10, 300), 256)


# -- eval pipelines ---------------------------------------------------------------------------------------------
def test_eval_egoclip_equals_resize_crop_resize_by_hand():
    frames = random_frames(2, 240, 320)
    x = frames.permute(0, 3, 1, 2).float() / 255
    # Resize(256): 240x320 -> 256x341; CenterCrop(256): left = round(85 / 2) = 42; Resize(224)
    x = F.interpolate(x, size=(256, 341), mode="bilinear", align_corners=False)[..., :, 42:298]
    x = F.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    out = eval_transform(frames, 224)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 224, 224)
    torch.testing.assert_close(out, (x - mean) / std, rtol=0, atol=1e-5)


def test_eval_crop_scales_with_the_model_size():
    # size 32 (tiny model): crop round(32 * 256 / 224) = 37, then 37 -> 32
    frames = random_frames(4, 48, 64)
    x = frames.permute(0, 3, 1, 2).float() / 255
    x = F.interpolate(x, size=(37, 49), mode="bilinear", align_corners=False)[..., :, 6:43]  # round(12/2) = 6
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(eval_transform(frames, 32), x, rtol=0, atol=1e-5)


def test_normalisation_numbers():
    frames = torch.zeros(3, 48, 64, 3, dtype=torch.uint8)
    frames[..., 1], frames[..., 2] = 51, 255
    out = eval_transform(frames, 32)
    expected = [(0 - 0.485) / 0.229, (0.2 - 0.456) / 0.224, (1.0 - 0.406) / 0.225]  # -2.1179, -1.1429, 2.64
    for c in range(3):
        torch.testing.assert_close(out[:, c], torch.full((3, 32, 32), expected[c]), rtol=0, atol=1e-5)


def test_eval_epic_is_resize_then_crop_on_0_255_pixels():
    frames = random_frames(2, 48, 80)
    out = eval_transform(frames, 32, variant="epic")
    # Resize(32): 48x80 -> 32x53; CenterCrop(32): left = round(21 / 2) = 10 (10.5 -> 10)
    x = F.interpolate(frames.permute(0, 3, 1, 2).float(), size=(32, 53), mode="bilinear", align_corners=False)[
        ..., 10:42
    ]
    mean = torch.tensor([123.675, 116.28, 103.53]).view(1, 3, 1, 1)  # the official x255 statistics
    std = torch.tensor([58.395, 57.12, 57.375]).view(1, 3, 1, 1)
    torch.testing.assert_close(out, (x - mean) / std, rtol=0, atol=1e-5)
    assert out.shape == (2, 3, 32, 32)


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="uint8"):
        eval_transform(torch.zeros(2, 48, 64, 3), 32)
    with pytest.raises(ValueError, match="uint8"):
        eval_transform(torch.zeros(2, 3, 48, 64, dtype=torch.uint8), 32)
    with pytest.raises(ValueError, match="variant"):
        eval_transform(random_frames(), 32, variant="charades")


# -- train pipeline ---------------------------------------------------------------------------------------------
def test_random_resized_crop_params_stay_within_scale_and_ratio():
    height, width = 240, 320
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        top, left, h, w = random_resized_crop_params(height, width, generator=g)
        assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
        # sizes are rounded to whole pixels: allow half a pixel on each side
        assert 0.5 * height * width <= (h + 0.5) * (w + 0.5) and (h - 0.5) * (w - 0.5) <= height * width
        assert 3 / 4 <= (w + 0.5) / (h - 0.5) and (w - 0.5) / (h + 0.5) <= 4 / 3


def _torchvision_get_params(height, width, generator):
    """torchvision 0.14 RandomResizedCrop.get_params, line for line (scale (0.5, 1), ratio (3/4, 4/3)), with its
    global-RNG calls given `generator`."""
    scale, ratio = (0.5, 1.0), (3.0 / 4.0, 4.0 / 3.0)
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect_ratio = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator)).item()
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            i = torch.randint(0, height - h + 1, size=(1,), generator=generator).item()
            j = torch.randint(0, width - w + 1, size=(1,), generator=generator).item()
            return i, j, h, w
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w = width
        h = height
    return (height - h) // 2, (width - w) // 2, h, w


@pytest.mark.parametrize("seed", [18658, *range(40)])
def test_random_resized_crop_params_match_torchvision_draw_for_draw(seed):
    # Seed 18658 at 256 x 455, 9th attempt: the crop height is 251.5 + 4e-6 with the aspect's exp in float32
    # (torchvision's torch.exp(...).item()) and 251.5 - 6e-7 with it in double, so h rounds to 252, not 251.
    expected = _torchvision_get_params(256, 455, torch.Generator().manual_seed(seed))
    assert random_resized_crop_params(256, 455, generator=torch.Generator().manual_seed(seed)) == expected


@pytest.mark.parametrize(
    "hw, expected",
    [
        ((4, 200), (0, 97, 4, 5)),  # too wide: h = 4, w = round(4 * 4/3) = 5, centred
        ((200, 4), (97, 0, 5, 4)),  # too tall: w = 4, h = round(4 / (3/4)) = 5
    ],
)
def test_random_resized_crop_falls_back_to_a_centre_crop(hw, expected):
    # no crop of >= half the area with aspect in [3/4, 4/3] fits, so all 10 attempts fail
    assert random_resized_crop_params(*hw, generator=torch.Generator().manual_seed(0)) == expected


def test_train_transform_is_deterministic_with_a_generator():
    frames = random_frames(4, 48, 64)
    a = train_transform(frames, 32, torch.Generator().manual_seed(1))
    b = train_transform(frames, 32, torch.Generator().manual_seed(1))
    assert a.dtype == torch.float32 and a.shape == (4, 3, 32, 32) and torch.equal(a, b)
    others = [train_transform(frames, 32, torch.Generator().manual_seed(s)) for s in (2, 3, 4)]
    assert any(not torch.equal(a, o) for o in others)


def test_train_transform_draws_crop_then_flip_in_that_order():
    frames = random_frames(2, 48, 64)
    for seed in range(6):
        g = torch.Generator().manual_seed(seed)
        top, left, h, w = random_resized_crop_params(48, 64, generator=g)
        flip = torch.rand(1, generator=g).item() < 0.5
        x = frames.permute(0, 3, 1, 2).float()[..., top : top + h, left : left + w] / 255
        x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
        x = x.flip(-1) if flip else x
        x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        torch.testing.assert_close(
            train_transform(frames, 32, torch.Generator().manual_seed(seed)), x, rtol=0, atol=1e-5
        )


def test_one_crop_for_all_frames():
    # frame k = frame 0 + 10k: with one crop (a linear map) the outputs differ by 10k/255/std everywhere
    base = random_frames(1, 48, 64)[0].clamp(max=200)
    frames = torch.stack([base + 10 * k for k in range(4)])
    out = train_transform(frames, 32, torch.Generator().manual_seed(7))
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    for k in range(1, 4):
        torch.testing.assert_close(out[k] - out[0], (10 * k / 255 / std).expand(3, 32, 32), rtol=0, atol=1e-5)


def test_flip_probability_is_one_half_and_epic_never_flips():
    ramp = column_ramp()
    flips = epic_flips = 0
    for seed in range(200):
        out = train_transform(ramp, 16, torch.Generator().manual_seed(seed))
        flips += bool(out[0, 0, 0, 0] > out[0, 0, 0, -1])  # a flipped ramp decreases
        out = train_transform(ramp, 16, torch.Generator().manual_seed(seed), variant="epic")
        epic_flips += bool(out[0, 0, 0, 0] > out[0, 0, 0, -1])
    assert 70 <= flips <= 130  # Binomial(200, 0.5): mean 100, sd 7
    assert epic_flips == 0


def test_train_epic_normalises_0_255_pixels():
    frames = torch.full((2, 48, 64, 3), 128, dtype=torch.uint8)
    out = train_transform(frames, 16, torch.Generator().manual_seed(0), variant="epic")
    expected = torch.tensor([(128 - 123.675) / 58.395, (128 - 116.28) / 57.12, (128 - 103.53) / 57.375])
    torch.testing.assert_close(out[:, :, 5, 5], expected.expand(2, 3), rtol=0, atol=1e-5)


# -- lax fallback -----------------------------------------------------------------------------------------------
def test_black_clip_is_the_official_transformed_black_frame_zero_padded():
    clip = black_clip(4, 32)
    assert clip.shape == (4, 3, 32, 32) and clip.dtype == torch.float32
    black = torch.zeros(1, 32, 32, 3, dtype=torch.uint8)  # official: Image.new('RGB', (res, res), (0, 0, 0))
    torch.testing.assert_close(clip[:1], eval_transform(black, 32), rtol=0, atol=1e-6)
    torch.testing.assert_close(
        clip[:1], train_transform(black, 32, torch.Generator().manual_seed(0)), rtol=0, atol=1e-6
    )
    assert math.isclose(clip[0, 0, 0, 0].item(), -0.485 / 0.229, rel_tol=1e-6)
    assert torch.count_nonzero(clip[1:]) == 0


def test_module_constants():
    assert T.TRAIN_SCALE == (0.5, 1.0) and T.TRAIN_RATIO == (0.75, 4 / 3) and T.FLIP_P == 0.5
