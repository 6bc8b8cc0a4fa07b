"""Out-of-range preprocessing arguments raise the documented ValueError before the output is allocated."""

import pytest
import torch

from egovlp_deploy import preprocess

pytestmark = pytest.mark.skipif(not preprocess.available(), reason="the C++ extension is not built")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(size=10**9), r"size must be a positive int at most 16384 \(preprocess.MAX_SIDE\), got 1000000000"),
        (
            dict(spec=preprocess.ClipSpec(224, 224, 10**9, 1.0, (0, 0, 0), (1, 1, 1))),
            "short_side must be a positive int",
        ),
        (dict(size=12_000), r"3, 12000, 12000\) torch.float32 would take \d+ bytes, above preprocess.MAX_OUTPUT_BYTES"),
    ],
)
def test_huge_sizes_raise_value_error(kwargs, match, monkeypatch):
    monkeypatch.setattr(preprocess, "MAX_OUTPUT_BYTES", 1 << 30)
    frames = torch.zeros(2, 8, 8, 3, dtype=torch.uint8)
    with pytest.raises(ValueError, match=match):
        preprocess.preprocess_clip(frames, **kwargs)
    with pytest.raises(ValueError, match=match):
        preprocess.preprocess_clips([frames], **kwargs)
