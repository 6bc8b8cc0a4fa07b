"""Compile the Triton kernels for a GPU architecture on a machine without one (Triton's ahead-of-time path:
front end, LLVM, ptxas), to catch what the CPU interpreter accepts but the GPU compiler rejects (dot shapes, dtype
mixes, layouts) before any GPU time is spent.

    python -m egovlp_deploy.kernels.aot_check [--arch 90] [--dtypes fp16,bf16,fp32] [--all-configs] [--resources]

Must run WITHOUT TRITON_INTERPRET=1 (the interpreter replaces the kernels by Python functions); the tests call it
in a subprocess. Prints one JSON line per kernel variant ({"kernel", "dtype", "config", "ok", "error",
"cubin_bytes"}, and with --resources the registers per thread and spill bytes that `ptxas -v` reports) and exits 1
if any failed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

# Triton dtype -> the dot precision the launcher passes on a GPU (`_triton_common.dot_flags`).
DOT_PRECISION = {"fp16": "tf32", "bf16": "tf32", "fp32": "ieee"}


def variants(dtypes: list[str], all_configs: bool):
    """(kernel name, kernel, pointer args, dtype, constexprs, config) for every variant to build."""
    import triton

    from . import _triton_common as common
    from . import divided_attention as da
    from . import gated_cross_attention as gca

    for dtype in dtypes:
        precision = DOT_PRECISION[dtype]
        for config in da._CONFIGS if all_configs else da._CONFIGS[:1]:
            for packed in (True, False):
                for head_dim in (64, 16):
                    for split in (False, True):
                        yield (
                            "divided_attention",
                            da._divided_attention_kernel,
                            ("qkv_ptr", "out_ptr"),
                            dtype,
                            dict(
                                HEAD_DIM=head_dim,
                                BLOCK_D=head_dim,
                                PACKED=packed,
                                SPLIT_CLS=split,
                                UPCAST=False,
                                PRECISION=precision,
                                **config.kwargs,
                            ),
                            config,
                        )
        for config in gca._CONFIGS if all_configs else gca._CONFIGS[:1]:
            for has_bias in (True, False):
                for split in (False, True):
                    yield (
                        "cross_attention",
                        gca._cross_attention_kernel,
                        ("q_ptr", "k_ptr", "v_ptr", "bias_ptr", "out_ptr"),
                        dtype,
                        dict(
                            HAS_BIAS=has_bias,
                            HEAD_DIM=64,
                            BLOCK_D=64,
                            SPLIT=split,
                            UPCAST=False,
                            PRECISION=precision,
                            **config.kwargs,
                        ),
                        config,
                    )
        for head_dim in (64, 16):
            yield (
                "combine_splits",
                common._combine_splits_kernel,
                ("out_ptr",),
                dtype,
                dict(HEAD_DIM=head_dim, BLOCK_D=head_dim, BLOCK_R=common.COMBINE_BLOCK_R),
                triton.Config({}, num_warps=4, num_stages=2),
            )


# The split-key workspaces: fp32 whatever the input dtype.
FP32_POINTERS = ("m_ws", "l_ws", "acc_ws")


def build(kernel, pointers, dtype: str, constants: dict, config, arch: int):
    """The compiled variant (`.asm` holds ptx and cubin): integer arguments as i32, `scale` as fp32, pointers of
    `dtype`, workspace pointers fp32."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler import compile as triton_compile

    names = kernel.arg_names
    signature = {
        n: "constexpr"
        if n in constants
        else ("*" + dtype if n in pointers else "*fp32" if n in FP32_POINTERS else "fp32" if n == "scale" else "i32")
        for n in names
    }
    source = ASTSource(fn=kernel, signature=signature, constexprs={(names.index(k),): v for k, v in constants.items()})
    return triton_compile(
        source,
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": config.num_warps, "num_stages": config.num_stages},
    )


def resources(ptx: str, arch: int) -> dict:
    """Registers per thread and spill bytes from `ptxas -v` (Triton's bundled ptxas binaries; the newest one that
    accepts the PTX version)."""
    import triton

    binaries = sorted(Path(triton.__file__).parent.glob("backends/nvidia/bin/ptxas*"), reverse=True)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        for ptxas in binaries:
            out = subprocess.run(
                [str(ptxas), "-v", f"--gpu-name=sm_{arch}a", str(src), "-o", str(src) + ".cubin"],
                capture_output=True,
                text=True,
            )
            if out.returncode == 0:
                text = out.stdout + out.stderr
                regs = re.search(r"Used (\d+) registers", text)
                spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
                return {
                    "registers": int(regs.group(1)) if regs else None,
                    "spill_store_bytes": int(spills.group(1)) if spills else None,
                    "spill_load_bytes": int(spills.group(2)) if spills else None,
                }
    return {"registers": None, "note": "no bundled ptxas accepted the PTX"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m egovlp_deploy.kernels.aot_check",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (default: 90, Hopper)")
    parser.add_argument("--dtypes", default="fp16,bf16,fp32", help="comma list (default: %(default)s)")
    parser.add_argument(
        "--all-configs", action="store_true", help="every autotuning config (default: the first of each kernel)"
    )
    parser.add_argument("--resources", action="store_true", help="also registers and spills (ptxas -v)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: the interpreter replaces the kernels by Python functions")
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    unknown = sorted(set(dtypes) - set(DOT_PRECISION))
    if unknown:
        parser.error(f"unknown dtypes {unknown}; choose from {sorted(DOT_PRECISION)}")
    failed = 0
    for name, kernel, pointers, dtype, constants, config in variants(dtypes, args.all_configs):
        record = {
            "kernel": name,
            "dtype": dtype,
            "config": {**constants, "num_warps": config.num_warps, "num_stages": config.num_stages},
        }
        try:
            compiled = build(kernel, pointers, dtype, constants, config, args.arch)
            record.update(ok=True, cubin_bytes=len(compiled.asm["cubin"]))
            if args.resources:
                record.update(resources(compiled.asm["ptx"], args.arch))
        except Exception as exc:  # a compile error is the result being looked for
            failed += 1
            record.update(ok=False, error=f"{type(exc).__name__}: {str(exc)[:2000]}")
        print(json.dumps(record), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
