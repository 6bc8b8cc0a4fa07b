"""AOTInductor packages (`.pt2`): torch.export + `torch._inductor.aoti_compile_and_package`, loaded with
`torch._inductor.aoti_load_package` — a Python-light deployment path (the package runs from C++ too).

A package is native code: loading one runs the shared library inside it with the rights of the process. The runtime
loads only a package whose bytes are those the manifest hashes, and loads the very bytes it hashed
(`load_checked_package`): the file is copied into a private temp folder while it is hashed, and the copy is loaded,
so a file replaced after the check is never what runs.

Roles: video encoder, text encoder, video fusion prefix and fusion head (`specs.AOTI_ROLES`): the one-graph fusion
is their composition. On CUDA the model runs the 'triton' attention backend when asked (`attention='triton'`), so
the package carries the project's Triton kernels as custom ops; on the CPU the reference backend is used (Triton
kernels need a GPU). A package is tied to the torch version that built it (the manifest loader refuses others).

The default O1 wrapper compiles several times slower than `opt_level='O0'`, and O0 costs little at run time (the
wrapper only launches kernels; the kernels keep their own optimisation), so tests use O0.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .program import exported
from .specs import AOTI_ROLES, ROLES


@dataclass
class AotiExport:
    role: str
    path: Path
    device: str
    precision: str
    seconds: float


def export_aoti(
    model,
    role: str,
    path: str | os.PathLike,
    *,
    max_batch: int,
    max_text_len: int,
    device: str = "cpu",
    precision: str = "fp32",
    attention: str = "reference",
    wrapper_opt_level: str = "O1",
) -> AotiExport:
    """Compile `role` into an AOTInductor package at `path` (written to a temp name, then renamed)."""
    if role not in AOTI_ROLES:
        raise ValueError(f"AOTInductor packages are built for {AOTI_ROLES}, not {role!r}")
    if device == "cpu" and precision != "fp32":
        raise ValueError(
            "AOTInductor fp16/bf16 packages are built for CUDA only (CPU half kernels are slow and "
            "not a deployment target)"
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    sizes = {"max_batch": max_batch, "max_text_len": max_text_len}
    with exported(model, role, device=device, precision=precision, attention=attention, **sizes) as program:
        tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.pt2")  # the packager insists on .pt2
        try:
            torch._inductor.aoti_compile_and_package(
                program,
                package_path=str(tmp),
                inductor_configs={"aot_inductor.compile_wrapper_opt_level": wrapper_opt_level},
            )
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
    return AotiExport(role, path, device, precision, time.perf_counter() - t0)


class AotiLoadError(RuntimeError):
    """A package AOTInductor built that its own loader cannot load."""


# A fresh interpreter that only loads the package: what a deployment does first.
_LOAD_ONLY = "import sys, torch; torch._inductor.aoti_load_package(sys.argv[1])"


def check_loads_in_child(path: str | os.PathLike, timeout_s: float = 180.0, command: list[str] | None = None) -> float:
    """Load the package in a child process first; seconds taken, or AotiLoadError naming how the loader failed.

    Why: the loader of a freshly built CUDA package can die with SIGSEGV inside the exporting process, or not return
    in a fresh one (BENCHMARKS.md). In-process, that kills the export and every artifact it has not recorded yet; in
    a child it is one named failure, and the export goes on. `command` replaces the child's interpreter command
    (tests)."""
    argv = (command or [sys.executable, "-c", _LOAD_ONLY]) + [str(path)]
    t0 = time.perf_counter()
    where = f"{path}: torch {torch.__version__}'s AOTInductor loader"
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise AotiLoadError(f"{where} did not return within {timeout_s:.0f} s in a fresh process") from None
    if done.returncode < 0:
        try:
            name = signal.Signals(-done.returncode).name
        except ValueError:
            name = f"signal {-done.returncode}"
        raise AotiLoadError(f"{where} died with {name} in a fresh process")
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise AotiLoadError(f"{where} failed in a fresh process (exit {done.returncode}): {last}")
    return time.perf_counter() - t0


def load_checked_package(path: str | os.PathLike, sha256: str, size: int):
    """`aoti_load_package` of the package at `path` if its bytes have this `sha256` and `size` (ArtifactError
    otherwise). The bytes are hashed while they are copied into a private temp folder (mode 0700), and that copy is
    what the loader reads: a file swapped or rewritten between a check by path and the load would run unchecked
    native code. The copy is removed once loaded (the loader keeps its own extraction)."""
    from .manifest import ArtifactError

    path = Path(path)
    room = f"the temp folder ({tempfile.gettempdir()}; TMPDIR chooses it) needs room for a copy of the package"
    try:
        work = Path(tempfile.mkdtemp(prefix="egovlp-aoti-"))
    except OSError as exc:
        raise ArtifactError(f"{path}: cannot make the private folder it is loaded from ({exc}); {room}") from None
    try:
        copy = work / "package.pt2"
        digest, copied = hashlib.sha256(), 0
        with open(path, "rb") as src:
            try:
                dst = open(copy, "xb")
            except OSError as exc:
                raise ArtifactError(f"{path}: cannot copy it to {copy} to load it from there ({exc}); {room}") from None
            with dst:
                while chunk := src.read(1 << 20):
                    digest.update(chunk)
                    try:
                        dst.write(chunk)
                    except OSError as exc:
                        raise ArtifactError(
                            f"{path}: cannot copy it to {copy} to load it from there ({exc}); {room}"
                        ) from None
                    copied += len(chunk)
                    if copied > size:
                        break
        if copied != size or digest.hexdigest() != sha256:
            raise ArtifactError(
                f"{path}: the package read for loading is not the one the manifest hashes (sha256 or size differs: "
                f"a corrupt or replaced file, or one changed while it was loaded); nothing of it was run"
            )
        return torch._inductor.aoti_load_package(str(copy))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def load_aoti(path: str | os.PathLike, role: str, device: str = "cpu"):
    """A callable `run(numpy inputs) -> {output name: numpy}` over a package (for the validator)."""
    import numpy as np

    runner = torch._inductor.aoti_load_package(str(path))
    spec = ROLES[role]

    def run(inputs: dict) -> dict:
        args = {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in inputs.items()}
        out = runner(**args)
        out = out if isinstance(out, (list, tuple)) else [out]
        return {name: t.detach().float().cpu().numpy() for name, t in zip(spec.output_names, out)}

    return run
