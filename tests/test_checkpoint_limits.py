"""Hostile checkpoints and sizes are refused before anything large is allocated or decompressed.

Each bomb is built here (no binary files in the repository) and loaded in a fresh Python process, which measures
the time and the peak resident memory the load adds over the process's memory after its imports (torch's import
alone is hundreds of MB). Every bomb must be refused within 1 s and 200 MB. The child caps its address space 4 GB
above its start and each load at 20 s, so code that does try the allocation fails there instead of taking the
machine's memory or time.
"""

import collections
import io
import json
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from egovlp_deploy import CheckpointError, EgoVLPv2
from egovlp_deploy.checkpoint import read_torch_checkpoint
from official_format import saved_random_tiny, write_official_checkpoint

MAX_SECONDS, MAX_GROWTH_MB = 1.0, 200

CHILD = r"""
import json, re, resource, signal, sys, time

import torch  # noqa: F401  (imports first: they are the baseline)
import egovlp_deploy.cli, egovlp_deploy.trainer.evaluate, egovlp_deploy.trainer.train  # noqa: F401
from egovlp_deploy import EgoVLPv2
from egovlp_deploy.checkpoint import read_torch_checkpoint

egovlp_deploy.cli.build_parser()  # imports every command's module


def status_mb(field):
    return int(re.search(field + r":\s+(\d+) kB", open("/proc/self/status").read()).group(1)) / 1024


def give_up(signum, frame):
    raise TimeoutError("still running after 20 s")


resource.setrlimit(resource.RLIMIT_AS, (int(status_mb("VmSize") * 2**20) + (4 << 30), resource.RLIM_INFINITY))
signal.signal(signal.SIGALRM, give_up)
results = {}
for name, action in json.loads(sys.argv[1]).items():
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets the peak RSS (VmHWM) to the current RSS
        f.write("5")
    base = status_mb("VmRSS")
    t0 = time.perf_counter()
    signal.alarm(20)
    try:
        result, error = repr(eval(action)), None
    except BaseException as exc:
        result, error = None, f"{type(exc).__name__}: {exc}"
    signal.alarm(0)
    seconds = time.perf_counter() - t0
    results[name] = {"seconds": seconds, "growth_mb": status_mb("VmHWM") - base, "base_mb": base, "error": error,
                     "result": result}
print(json.dumps(results))
"""


def measure(actions: dict[str, str], timeout: float = 300) -> dict:
    """Run each Python expression of `actions` in one fresh process; per name its error (or result), seconds and
    peak RSS growth in MB over the RSS just before it."""
    done = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(actions)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=Path(__file__).parent,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def assert_refused_cheaply(out: dict, error: str | None, match: str) -> None:
    print(
        f"{out['seconds'] * 1000:.1f} ms, peak +{out['growth_mb']:.1f} MB over {out['base_mb']:.0f} MB: "
        f"{out['error'] or out['result']}"
    )
    if error is None:
        assert out["error"] is None and out["result"] == match, out
    else:
        assert out["error"] is not None and out["error"].startswith(error + ":"), out
        assert match in out["error"], out
    assert out["seconds"] < MAX_SECONDS, out
    assert out["growth_mb"] < MAX_GROWTH_MB, out


# -- crafted torch zip checkpoints ------------------------------------------------------------------------------
class _Storage:
    def __init__(self, key: str, numel: int):
        self.key, self.numel = key, numel


class _Tensor:
    """Pickles as the official files' `_rebuild_tensor_v2(storage, offset, size, stride, ...)` call."""

    def __init__(self, storage: _Storage, size: tuple, stride: tuple):
        self.storage, self.size, self.stride = storage, size, stride

    def __reduce__(self):
        return (
            torch._utils._rebuild_tensor_v2,
            (self.storage, 0, self.size, self.stride, False, collections.OrderedDict()),
        )


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            return ("storage", torch.FloatStorage, obj.key, "cpu", obj.numel)
        return None


def write_zip_bomb(path: Path, nbytes: int) -> None:
    """A checkpoint whose one float storage declares `nbytes` (all zeros) and is deflated to about nbytes / 1000."""
    storage = _Storage("0", nbytes // 4)
    data = io.BytesIO()
    _Pickler(data, protocol=2).dump({"state_dict": {"w": _Tensor(storage, (nbytes // 4,), (1,))}})
    # the deflated member is streamed in 1 MiB blocks of zeros: the payload is never in memory at once
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", data.getvalue())
        z.writestr("archive/byteorder", "little")
        info = zipfile.ZipInfo("archive/data/0")
        info.compress_type = zipfile.ZIP_DEFLATED
        zeros = bytes(1 << 20)
        with z.open(info, "w") as member:
            for _ in range(nbytes >> 20):
                member.write(zeros)


@pytest.fixture(scope="module")
def tiny_state():
    """The tiny model's state dict (module names as in the official files, minus DDP's `module.` prefix)."""
    torch.manual_seed(0)
    from egovlp_deploy import EgoVLPv2Config

    return EgoVLPv2(EgoVLPv2Config.tiny()).state_dict()


@pytest.fixture(scope="module")
def bombs(tmp_path_factory, tiny_state):
    """Every bomb built, then loaded in one fresh process: {name: measurement}."""
    tmp = tmp_path_factory.mktemp("bombs")
    actions = {}

    stride0 = tmp / "stride0.pth"  # an 8-byte storage viewed as (1, 4e9) with stride 0: 32 GB once copied
    official = {"module." + k: v for k, v in tiny_state.items()}
    official["module.text_model.embeddings.position_ids"] = torch.zeros(1, 1, dtype=torch.int64).expand(1, 4 * 10**9)
    torch.save({"state_dict": official}, stride0)
    actions["stride0"] = f"EgoVLPv2.from_official_checkpoint({str(stride0)!r})"

    zip_bomb = tmp / "bomb.pth"  # 256 MB of zeros deflated to about 250 kB
    write_zip_bomb(zip_bomb, 256 << 20)
    assert zip_bomb.stat().st_size < 1 << 20
    actions["zip_bomb"] = f"read_torch_checkpoint({str(zip_bomb)!r})"

    model_dir, _ = saved_random_tiny(tmp / "model", seed=1)  # --frames 1e9: a 256 GB temporal embedding
    argv = [
        "eval",
        "--model",
        str(model_dir),
        "--frames",
        str(10**9),
        "--egomcq",
        str(tmp / "q.json"),
        "--video-root",
        str(tmp),
        "--tokenizer",
        str(tmp),
    ]
    actions["eval_frames"] = f"egovlp_deploy.cli.main({argv!r})"

    plain = tmp / "official.pth"
    write_official_checkpoint(tiny_state, plain, max_positions=66)
    actions["official_frames"] = f"EgoVLPv2.from_official_checkpoint({str(plain)!r}, num_frames=10**9)"

    deep_dir, _ = saved_random_tiny(tmp / "deep", seed=1)  # depth 100000: minutes and GBs of modules
    config = json.loads((deep_dir / "config.json").read_text())
    config["video"]["depth"] = 100_000
    (deep_dir / "config.json").write_text(json.dumps(config))
    actions["deep_config"] = f"EgoVLPv2.from_pretrained({str(deep_dir)!r})"
    return measure(actions)


def test_stride_zero_storage_declaring_billions_of_elements(bombs):
    assert_refused_cheaply(bombs["stride0"], "CheckpointError", "does not fit its storage of 1 elements")


def test_zip_bomb_storage_is_refused_before_decompression(bombs):
    assert_refused_cheaply(bombs["zip_bomb"], "CheckpointError", "would unpack past")


def test_eval_with_a_billion_frames(bombs):
    assert_refused_cheaply(bombs["eval_frames"], None, "2")  # a bad input: one line on stderr, exit status 2


def test_official_checkpoint_at_a_billion_frames(bombs):
    assert_refused_cheaply(
        bombs["official_frames"], "ConfigError", "num_frames must be an integer in [1, 512], got 1000000000"
    )


def test_config_json_with_huge_depth(bombs):
    assert_refused_cheaply(
        bombs["deep_config"], "CheckpointError", "video.depth must be an integer in [1, 128], got 100000"
    )


# -- malformed containers ----------------------------------------------------------------------------------------
class _ShadowedItems(collections.OrderedDict):
    """Pickles as an OrderedDict whose instance attribute `items` (an int) shadows the method."""

    def __reduce__(self):
        return (collections.OrderedDict, (), {"items": 5}, None, iter(collections.OrderedDict.items(self)))


def test_state_dict_with_shadowed_items_method(tmp_path, tiny_state):
    path = tmp_path / "shadowed.pth"
    official = {"module." + k: v for k, v in tiny_state.items()}
    torch.save({"state_dict": _ShadowedItems(official)}, path)
    model = EgoVLPv2.from_official_checkpoint(path)  # the attribute is data, never a method we call
    assert torch.equal(model.state_dict()["video_model.pos_embed"], tiny_state["video_model.pos_embed"])
    torch.save(_ShadowedItems(official), path)  # a bare state dict
    assert set(EgoVLPv2.from_official_checkpoint(path).state_dict()) == set(tiny_state)


def test_tensor_views_outside_their_storage(tmp_path):
    for size, stride, match in [
        ((11,), (1,), "does not fit its storage of 10 elements"),
        ((2, 5), (5, 2), "does not fit its storage"),
        ((-1,), (1,), "malformed checkpoint: a tensor has size"),
        ((3,), (-1,), "malformed checkpoint: a tensor has size"),
    ]:
        data = io.BytesIO()
        _Pickler(data, protocol=2).dump({"w": _Tensor(_Storage("0", 10), size, stride)})
        path = tmp_path / "view.pth"
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("archive/data.pkl", data.getvalue())
            z.writestr("archive/data/0", bytes(40))
        with pytest.raises(CheckpointError, match=match):
            read_torch_checkpoint(path)


def test_storage_entry_size_is_checked_before_reading(tmp_path):
    data = io.BytesIO()
    _Pickler(data, protocol=2).dump({"w": _Tensor(_Storage("0", 10**9), (10**9,), (1,))})
    path = tmp_path / "short.pth"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", data.getvalue())
        z.writestr("archive/data/0", bytes(40))
    with pytest.raises(CheckpointError, match="holds 40 bytes, its tensor needs 4000000000"):
        read_torch_checkpoint(path)
