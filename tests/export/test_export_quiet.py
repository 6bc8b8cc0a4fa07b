"""An ONNX export prints the exporter's own progress and problems, not torch's known harmless messages (torchvision
operators not registered, a pytree deprecation, shared dynamic axes), which would otherwise come on every role
between the export's progress lines."""

import logging
import warnings

import torch

from egovlp_deploy import EgoVLPv2, EgoVLPv2Config
from egovlp_deploy.export.onnx_export import _quiet_exporter, export_onnx

HARMLESS = ("torchvision is not installed", "LeafSpec", "will not be used, since it shares the same shape")


def test_an_export_shows_none_of_torchs_harmless_messages(tmp_path, caplog):
    torch.manual_seed(0)
    model = EgoVLPv2(EgoVLPv2Config.tiny()).eval()
    caplog.set_level(logging.WARNING, logger="torch.onnx")
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        export_onnx(model, "text_encoder", tmp_path / "text_encoder.onnx", max_batch=4, max_text_len=8)
    said = [str(w.message) for w in shown] + [r.getMessage() for r in caplog.records]
    assert not [line for line in said if any(h in line for h in HARMLESS)]


def test_other_warnings_and_log_lines_still_show(caplog):
    caplog.set_level(logging.WARNING)
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        with _quiet_exporter():
            warnings.warn("the graph has a NaN constant", UserWarning, stacklevel=1)
            logging.getLogger("torch.onnx._internal.exporter._core").warning("fell back to the legacy exporter")
            registration = logging.getLogger("torch.onnx._internal.exporter._registration")
            registration.warning("torchvision is not installed. Skipping %s", "torchvision::nms")
            registration.warning("an operator has no translation")
    assert [str(w.message) for w in shown] == ["the graph has a NaN constant"]
    logged = [r.getMessage() for r in caplog.records]
    assert logged == ["fell back to the legacy exporter", "an operator has no translation"]
