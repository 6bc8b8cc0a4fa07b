"""A small ONNX Runtime session over one manifest artifact that checks its inputs before running.

The exported graphs have no Python checks (the export patcher removes them: they are data-dependent), and ORT's
own errors on a bad input are C++ messages about node names. Here every input is checked against the manifest:
names, rank, fixed sizes, the dynamic axes' bounds and their consistency across inputs (one `batch`), dtype.
"""

from __future__ import annotations

import os

import numpy as np

from .manifest import open_artifact


class ArtifactInputError(ValueError):
    """An input does not fit the artifact (name, shape, dtype, dynamic bound)."""


def check_inputs(io: dict, inputs: dict, where: str = "") -> None:
    """ArtifactInputError unless `inputs` (numpy arrays by name) fit the artifact: names, dtypes and shapes."""
    _check(io, inputs, where, arrays=True)


def check_input_shapes(io: dict, shapes: dict, where: str = "") -> None:
    """`check_inputs` for the shapes alone (tuples by name): for runners that cast the inputs to the dtype they run
    in themselves (the torch, program and aoti backends)."""
    _check(io, shapes, where, arrays=False)


def _check(io: dict, inputs: dict, where: str, arrays: bool) -> None:
    specs = {t["name"]: t for t in io["inputs"]}
    missing = [n for n in specs if n not in inputs]
    unexpected = [n for n in inputs if n not in specs]
    if missing or unexpected:
        raise ArtifactInputError(
            f"{where}inputs {sorted(inputs)} do not match the artifact's {list(specs)} "
            f"(missing {missing}, unexpected {unexpected})"
        )
    bound: dict[str, int] = {}
    for name, spec in specs.items():
        x = inputs[name]
        if arrays:
            if not isinstance(x, np.ndarray):
                raise ArtifactInputError(f"{where}{name} must be a numpy array, got {type(x).__name__}")
            if x.dtype != np.dtype(spec["dtype"]):
                raise ArtifactInputError(f"{where}{name} has dtype {x.dtype}, the artifact takes {spec['dtype']}")
        shape = tuple(x.shape) if arrays else tuple(x)
        if len(shape) != len(spec["shape"]):
            raise ArtifactInputError(f"{where}{name} has shape {shape}, the artifact takes {spec['shape']}")
        for axis, (size, want) in enumerate(zip(shape, spec["shape"])):
            if isinstance(want, int):
                if size != want:
                    raise ArtifactInputError(
                        f"{where}{name} has shape {shape}: axis {axis} must be {want} (artifact shape {spec['shape']})"
                    )
                continue
            lo, hi = io["dynamic"].get(want, [1, None])
            if size < lo or (hi is not None and size > hi):
                raise ArtifactInputError(
                    f"{where}{name} axis {axis} ({want}) is {size}, outside the exported range [{lo}, {hi}]"
                )
            if bound.setdefault(want, size) != size:
                raise ArtifactInputError(
                    f"{where}{name} axis {axis} ({want}) is {size} but another input has {want} = {bound[want]}"
                )


class OrtArtifact:
    """`OrtArtifact(export_dir, role, precision)`: verified load, checked run.

    `run(**inputs)` -> {output name: array}. Providers default to CPU; pass e.g. ["CUDAExecutionProvider",
    "CPUExecutionProvider"] with onnxruntime-gpu (and check `session.get_providers()`: ORT falls back silently).
    """

    def __init__(
        self,
        export_dir: str | os.PathLike,
        role: str,
        precision: str = "fp32",
        variant: str = "",
        providers: list[str] | None = None,
        threads: int | None = None,
    ):
        from egovlp_deploy.ort_session import ort_session

        from .manifest import ArtifactError

        self.path, self.entry, self.manifest = open_artifact(export_dir, role, precision, "onnx", variant)
        self.session = ort_session(self.path, providers, threads, error=ArtifactError)
        self.role, self.precision = role, precision
        self.output_names = [t["name"] for t in self.entry.io["outputs"]]

    def run(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        check_inputs(self.entry.io, inputs, where=f"{self.role}/{self.precision}: ")
        return dict(zip(self.output_names, self.session.run(self.output_names, inputs)))

    __call__ = run
