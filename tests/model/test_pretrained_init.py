"""Pretrained tower initialisation (egovlp_deploy.pretrained_init): ViT files in timm/Google formats, HF RoBERTa dirs.

Files are written with random tensors under the names and layouts the real files use, at the tiny model's sizes;
the base-size name/shape match is checked on the meta device.
"""

import collections
import dataclasses
import io
import json
import os
import pickle
import pickletools
import zipfile

import numpy as np
import pytest
import torch

from egovlp_deploy import EgoVLPv2, EgoVLPv2Config
from egovlp_deploy.checkpoint import save_safetensors
from egovlp_deploy.pretrained_init import (
    TEXT_OWN_INIT,
    VIDEO_OWN_INIT,
    InitReport,
    PretrainedInitError,
    fill_by_name,
    init_text_tower,
    init_video_tower,
    read_state_dict,
)


# -- the names and shapes of the real files --------------------------------------------------------------------
def timm_vit_shapes(v, classes=1000) -> dict[str, tuple]:
    """timm VisionTransformer state dict (jx_vit_base_p16_224-80ecf9dd.pth at base size)."""
    w, mlp = v.width, int(v.width * v.mlp_ratio)
    shapes = {
        "cls_token": (1, 1, w),
        "pos_embed": (1, v.patches_per_frame + 1, w),
        "patch_embed.proj.weight": (w, v.in_chans, v.patch_size, v.patch_size),
        "patch_embed.proj.bias": (w,),
        "norm.weight": (w,),
        "norm.bias": (w,),
        "head.weight": (classes, w),
        "head.bias": (classes,),
    }
    for i in range(v.depth):
        b = f"blocks.{i}."
        shapes.update(
            {
                b + "norm1.weight": (w,),
                b + "norm1.bias": (w,),
                b + "attn.qkv.weight": (3 * w, w),
                b + "attn.qkv.bias": (3 * w,),
                b + "attn.proj.weight": (w, w),
                b + "attn.proj.bias": (w,),
                b + "norm2.weight": (w,),
                b + "norm2.bias": (w,),
                b + "mlp.fc1.weight": (mlp, w),
                b + "mlp.fc1.bias": (mlp,),
                b + "mlp.fc2.weight": (w, mlp),
                b + "mlp.fc2.bias": (w,),
            }
        )
    return shapes


def hf_roberta_shapes(t, prefix="") -> dict[str, tuple]:
    """RobertaForMaskedLM-style checkpoint names (roberta-base), without the lm_head."""
    h, m = t.hidden_size, t.intermediate_size
    shapes = {
        "embeddings.word_embeddings.weight": (t.vocab_size, h),
        "embeddings.position_embeddings.weight": (t.max_position_embeddings, h),
        "embeddings.token_type_embeddings.weight": (t.type_vocab_size, h),
        "embeddings.LayerNorm.weight": (h,),
        "embeddings.LayerNorm.bias": (h,),
        "pooler.dense.weight": (h, h),
        "pooler.dense.bias": (h,),
    }
    for i in range(t.num_hidden_layers):
        b = f"encoder.layer.{i}."
        for n in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            shapes.update({b + n + ".weight": (h, h), b + n + ".bias": (h,)})
        shapes.update(
            {
                b + "attention.output.LayerNorm.weight": (h,),
                b + "attention.output.LayerNorm.bias": (h,),
                b + "intermediate.dense.weight": (m, h),
                b + "intermediate.dense.bias": (m,),
                b + "output.dense.weight": (h, m),
                b + "output.dense.bias": (h,),
                b + "output.LayerNorm.weight": (h,),
                b + "output.LayerNorm.bias": (h,),
            }
        )
    return {prefix + k: v for k, v in shapes.items()}


def random_tensors(shapes, seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


NON_VIT_KEYS = ("timeattn", "norm3", "temporal_embed", "_i2t")  # the tower's parameters an image ViT does not have


@pytest.fixture
def model():
    torch.manual_seed(0)
    return EgoVLPv2(EgoVLPv2Config.tiny())


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def check_video(model, before, report: InitReport, file_sd: dict[str, torch.Tensor], ignored):
    vit_keys = set(timm_vit_shapes(model.config.video)) - {"head.weight", "head.bias"}
    assert sorted(report.filled) == sorted("video_model." + k for k in vit_keys)
    assert sorted(report.ignored) == sorted(ignored)
    after = model.state_dict()
    for key in vit_keys:
        assert torch.equal(after["video_model." + key], file_sd[key]), key  # bit for bit
    video_names = [k for k in after if k.startswith("video_model.")]
    assert sorted(report.left_at_init) == sorted(set(video_names) - set(report.filled))
    for key in report.left_at_init:
        assert any(part in key for part in NON_VIT_KEYS), key
    assert report.missing_from_file == [] and "WARNING" not in report.summary()
    for key in set(after) - set(report.filled):
        assert torch.equal(after[key], before[key]), key  # untouched, bit for bit
    # time_init='zeros': the temporal attention keeps its exact-zero start
    assert not model.video_model.blocks[0].timeattn.qkv.weight.any()
    assert "filled 54 tensors" in report.summary() and "video_model.blocks.*.timeattn.qkv.weight" in report.summary()


# -- video tower -------------------------------------------------------------------------------------------------
def test_video_from_timm_pth(model, tmp_path):
    sd = random_tensors(timm_vit_shapes(model.config.video))
    torch.save(sd, tmp_path / "vit.pth")  # zip format, read back through the restricted reader
    before = snapshot(model)
    report = init_video_tower(model, tmp_path / "vit.pth")
    check_video(model, before, report, sd, ["head.bias", "head.weight"])


def test_video_from_legacy_pth_with_module_prefix(model, tmp_path):
    sd = random_tensors(timm_vit_shapes(model.config.video), seed=1)
    torch.save({"module." + k: v for k, v in sd.items()}, tmp_path / "vit.pth", _use_new_zipfile_serialization=False)
    before = snapshot(model)
    report = init_video_tower(model, tmp_path / "vit.pth")
    check_video(model, before, report, sd, ["module.head.bias", "module.head.weight"])  # the file's names


def test_video_from_timm_safetensors(model, tmp_path):
    sd = random_tensors(timm_vit_shapes(model.config.video), seed=2)
    (tmp_path / "timm").mkdir()
    save_safetensors(sd, tmp_path / "timm" / "model.safetensors")
    before = snapshot(model)
    report = init_video_tower(model, tmp_path / "timm")  # a directory: its model.safetensors
    check_video(model, before, report, sd, ["head.bias", "head.weight"])


def google_npz(v, big_vision=False, stacked=False, seed=3) -> dict[str, np.ndarray]:
    """A ViT in jax naming and layouts: conv (kh, kw, in, out), dense (in, out), q/k/v (D, heads, head_dim),
    attention out (heads, head_dim, D)."""
    rng = np.random.default_rng(seed)
    w, h, mlp = v.width, v.heads, int(v.width * v.mlp_ratio)
    r = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    prefix = "params/" if big_vision else ""
    mha, mlpb, ln2 = (0, 0, 1) if big_vision else (1, 3, 2)
    arrays = {
        "embedding/kernel": r(v.patch_size, v.patch_size, v.in_chans, w),
        "embedding/bias": r(w),
        "cls": r(1, 1, w),
        "Transformer/encoder_norm/scale": r(w),
        "Transformer/encoder_norm/bias": r(w),
        "head/kernel": r(w, 1000),
        "head/bias": r(1000),
        "pre_logits/kernel": r(w, w),
        "pre_logits/bias": r(w),
    }
    pos = r(1, v.patches_per_frame + 1, w)
    arrays["pos_embedding" if big_vision else "Transformer/posembed_input/pos_embedding"] = pos
    block = {
        "LayerNorm_0/scale": (w,),
        "LayerNorm_0/bias": (w,),
        f"LayerNorm_{ln2}/scale": (w,),
        f"LayerNorm_{ln2}/bias": (w,),
        f"MlpBlock_{mlpb}/Dense_0/kernel": (w, mlp),
        f"MlpBlock_{mlpb}/Dense_0/bias": (mlp,),
        f"MlpBlock_{mlpb}/Dense_1/kernel": (mlp, w),
        f"MlpBlock_{mlpb}/Dense_1/bias": (w,),
        f"MultiHeadDotProductAttention_{mha}/out/kernel": (h, w // h, w),
        f"MultiHeadDotProductAttention_{mha}/out/bias": (w,),
    }
    for n in ("query", "key", "value"):
        block[f"MultiHeadDotProductAttention_{mha}/{n}/kernel"] = (w, h, w // h)
        block[f"MultiHeadDotProductAttention_{mha}/{n}/bias"] = (h, w // h)
    for name, shape in block.items():
        if stacked:
            arrays[f"Transformer/encoderblock/{name}"] = r(v.depth, *shape)
        else:
            for i in range(v.depth):
                arrays[f"Transformer/encoderblock_{i}/{name}"] = r(*shape)
    return {prefix + k: a for k, a in arrays.items()}


@pytest.mark.parametrize("big_vision,stacked", [(False, False), (True, True)])
def test_video_from_google_npz_computes_what_jax_computes(model, tmp_path, big_vision, stacked):
    v = model.config.video
    arrays = google_npz(v, big_vision, stacked)
    np.savez(tmp_path / "ViT-B_16.npz", **arrays)
    before = snapshot(model)
    report = init_video_tower(model, tmp_path / "ViT-B_16.npz")
    p = "params/" if big_vision else ""
    assert report.ignored == sorted(p + k for k in ("head/bias", "head/kernel", "pre_logits/bias", "pre_logits/kernel"))
    assert len(report.filled) == 54
    check_golden(report, "video", "tiny")  # the same names as the official loading of the timm .pth
    for key in set(before) - set(report.filled):
        assert torch.equal(model.state_dict()[key], before[key]), key
    a = {k[len(p) :]: torch.from_numpy(x) for k, x in arrays.items()}
    vm = model.video_model
    mha, mlpb, ln2 = (0, 0, 1) if big_vision else (1, 3, 2)
    with torch.no_grad():
        assert torch.equal(vm.cls_token, a["cls"])
        pos_name = "pos_embedding" if big_vision else "Transformer/posembed_input/pos_embedding"
        assert torch.equal(vm.pos_embed, a[pos_name])
        assert torch.equal(vm.norm.weight, a["Transformer/encoder_norm/scale"])
        # patch embedding: jax conv over an (h, w, c) patch == our Conv2d over the (c, h, w) patch
        patch = torch.randn(v.patch_size, v.patch_size, v.in_chans)
        jax_out = torch.einsum("ijc,ijco->o", patch, a["embedding/kernel"]) + a["embedding/bias"]
        ours = vm.patch_embed.proj(patch.permute(2, 0, 1)[None]).flatten()
        torch.testing.assert_close(ours, jax_out, rtol=1e-5, atol=1e-5)
        x = torch.randn(5, v.width)
        for i, block in enumerate(vm.blocks):

            def get(n, i=i):
                return a[f"Transformer/encoderblock/{n}"][i] if stacked else a[f"Transformer/encoderblock_{i}/{n}"]

            assert torch.equal(block.norm1.weight, get("LayerNorm_0/scale"))
            assert torch.equal(block.norm2.bias, get(f"LayerNorm_{ln2}/bias"))
            q, k, val = block.attn.qkv(x).chunk(3, dim=-1)
            for ours, n in ((q, "query"), (k, "key"), (val, "value")):
                m = f"MultiHeadDotProductAttention_{mha}/{n}/"
                jax = torch.einsum("nd,dhk->nhk", x, get(m + "kernel")) + get(m + "bias")
                torch.testing.assert_close(ours, jax.flatten(1), rtol=1e-5, atol=1e-4)
            heads = torch.randn(5, v.heads, v.width // v.heads)
            m = f"MultiHeadDotProductAttention_{mha}/out/"
            jax = torch.einsum("nhk,hkd->nd", heads, get(m + "kernel")) + get(m + "bias")
            torch.testing.assert_close(block.attn.proj(heads.flatten(1)), jax, rtol=1e-5, atol=1e-4)
            jax = x @ get(f"MlpBlock_{mlpb}/Dense_0/kernel") + get(f"MlpBlock_{mlpb}/Dense_0/bias")
            torch.testing.assert_close(block.mlp.fc1(x), jax, rtol=1e-5, atol=1e-4)


def plain_vit_cls(sd, image, heads, eps):
    """An image ViT (timm's forward) written out: the final-norm CLS of one image (C, H, W)."""
    F = torch.nn.functional
    x = (
        F.conv2d(
            image[None],
            sd["patch_embed.proj.weight"],
            sd["patch_embed.proj.bias"],
            stride=sd["patch_embed.proj.weight"].shape[-1],
        )
        .flatten(2)
        .transpose(1, 2)
    )
    x = torch.cat([sd["cls_token"], x], dim=1) + sd["pos_embed"]
    width = x.shape[-1]
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(depth):
        b = lambda n: sd[f"blocks.{i}.{n}"]  # noqa: E731
        h = F.layer_norm(x, (width,), b("norm1.weight"), b("norm1.bias"), eps)
        q, k, v = F.linear(h, b("attn.qkv.weight"), b("attn.qkv.bias")).view(1, -1, 3, heads, width // heads).unbind(2)
        att = torch.softmax(torch.einsum("bihd,bjhd->bhij", q, k) * (width // heads) ** -0.5, dim=-1)
        x = x + F.linear(torch.einsum("bhij,bjhd->bihd", att, v).flatten(2), b("attn.proj.weight"), b("attn.proj.bias"))
        h = F.layer_norm(x, (width,), b("norm2.weight"), b("norm2.bias"), eps)
        x = x + F.linear(
            F.gelu(F.linear(h, b("mlp.fc1.weight"), b("mlp.fc1.bias"))), b("mlp.fc2.weight"), b("mlp.fc2.bias")
        )
    return F.layer_norm(x, (width,), sd["norm.weight"], sd["norm.bias"], eps)[0, 0]


def test_initialised_video_tower_starts_as_the_image_vit(tmp_path):
    """time_init='zeros' and a zero temporal embedding: on one frame, the tower computes exactly the image ViT."""
    model = EgoVLPv2(EgoVLPv2Config.tiny(num_frames=1)).eval()
    v = model.config.video
    sd = {
        k: t * 0.2 if k.endswith("weight") and "norm" not in k else t
        for k, t in random_tensors(timm_vit_shapes(v), seed=5).items()
    }
    torch.save(sd, tmp_path / "vit.pth")
    init_video_tower(model, tmp_path / "vit.pth")
    image = torch.randn(v.in_chans, v.img_size, v.img_size)
    with torch.no_grad():
        ours = model.encode_video(image[None, None], project=False)[0]
        reference = plain_vit_cls(sd, image, v.heads, v.layer_norm_eps)
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)


def test_video_shape_mismatch_is_a_clear_error_and_changes_nothing(model, tmp_path):
    shapes = timm_vit_shapes(dataclasses.replace(model.config.video, img_size=48))  # 36 patches, not 16
    torch.save(random_tensors(shapes), tmp_path / "vit384.pth")
    before = snapshot(model)
    expected = r"pos_embed: file \(1, 37, 64\) vs model .*\(1, 17, 64\).*not resized"
    with pytest.raises(PretrainedInitError, match=expected):
        init_video_tower(model, tmp_path / "vit384.pth")
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_video_rejects_files_that_are_not_a_vit(model, tmp_path):
    save_safetensors(random_tensors(hf_roberta_shapes(model.config.text, "roberta.")), tmp_path / "text.safetensors")
    with pytest.raises(PretrainedInitError, match="not a ViT in timm names"):
        init_video_tower(model, tmp_path / "text.safetensors")
    hf_vit = {"vit.embeddings.patch_embeddings.projection.weight": torch.zeros(64, 3, 8, 8)}
    save_safetensors(hf_vit, tmp_path / "hf_vit.safetensors")
    with pytest.raises(PretrainedInitError, match="Hugging Face transformers ViTModel"):
        init_video_tower(model, tmp_path / "hf_vit.safetensors")
    both = {"cls_token": torch.zeros(1, 1, 64), "module.cls_token": torch.ones(1, 1, 64)}
    save_safetensors(both, tmp_path / "both.safetensors")
    with pytest.raises(PretrainedInitError, match="name the same tensor"):
        init_video_tower(model, tmp_path / "both.safetensors")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(PretrainedInitError, match="unknown format"):
        init_video_tower(model, tmp_path / "notes.txt")
    with pytest.raises(PretrainedInitError, match="no such file"):
        init_video_tower(model, tmp_path / "missing.pth")


# -- text tower --------------------------------------------------------------------------------------------------
def write_hf_dir(directory, text_config, weights_name, prefix, seed=4, **config_overrides):
    directory.mkdir()
    hf_config = {
        **dataclasses.asdict(text_config),
        "model_type": "roberta",
        "architectures": ["RobertaForMaskedLM"],
        "initializer_range": 0.02,
        **config_overrides,
    }
    (directory / "config.json").write_text(json.dumps(hf_config))
    sd = random_tensors(hf_roberta_shapes(text_config, prefix), seed=seed)
    extra = {prefix + "embeddings.position_ids": torch.arange(text_config.max_position_embeddings)[None]}
    if prefix:  # a RobertaForMaskedLM file also holds the LM head
        extra.update({"lm_head.dense.weight": torch.randn(64, 64), "lm_head.bias": torch.randn(text_config.vocab_size)})
    if weights_name == "model.safetensors":
        save_safetensors({**sd, **extra}, directory / weights_name)
    else:
        torch.save({**sd, **extra}, directory / weights_name)
    return sd, sorted(extra) + [prefix + "pooler.dense.bias", prefix + "pooler.dense.weight"]


@pytest.mark.parametrize("weights_name,prefix", [("model.safetensors", "roberta."), ("pytorch_model.bin", "")])
def test_text_from_hf_directory(model, tmp_path, weights_name, prefix):
    t = model.config.text
    sd, ignored = write_hf_dir(tmp_path / "roberta-base", t, weights_name, prefix)
    before = snapshot(model)
    report = init_text_tower(model, tmp_path / "roberta-base")
    used = {k[len(prefix) :]: v for k, v in sd.items() if "pooler" not in k}
    assert sorted(report.filled) == sorted("text_model." + k for k in used)
    assert sorted(report.ignored) == sorted(ignored)
    after = model.state_dict()
    for key, value in used.items():
        assert torch.equal(after["text_model." + key], value), key
    for key in set(after) - set(report.filled):
        assert torch.equal(after[key], before[key]), key
    # left at init: exactly the cross-attention and gates of the fused layers, at HF _init_weights values
    first_fused = t.num_hidden_layers - model.config.num_fuse_blocks
    assert report.left_at_init and all(
        ("crossattention_t2i" in k or "alpha_t2i" in k) and int(k.split(".")[3]) >= first_fused
        for k in report.left_at_init
    )
    for layer in model.text_model.encoder.layer[first_fused:]:
        assert layer.alpha_t2i.item() == 0.0
        cross = layer.crossattention_t2i
        assert not cross.self.query.bias.any() and not cross.output.dense.bias.any()
        assert abs(cross.self.key.weight.std().item() - 0.02) < 0.004
    assert "text tower" in report.summary() and f"filled {len(used)} tensors" in report.summary()
    assert report.missing_from_file == []


def test_incomplete_file_is_flagged(model, tmp_path):
    sd = random_tensors(timm_vit_shapes(model.config.video))
    del sd["blocks.3.mlp.fc2.weight"], sd["norm.bias"]
    save_safetensors(sd, tmp_path / "partial.safetensors")
    report = init_video_tower(model, tmp_path / "partial.safetensors")
    assert report.missing_from_file == ["video_model.blocks.3.mlp.fc2.weight", "video_model.norm.bias"]
    assert "WARNING: 2 backbone tensors were not in the file" in report.summary()


def test_text_legacy_layer_norm_names(model, tmp_path):
    t = model.config.text
    sd, _ = write_hf_dir(tmp_path / "old", t, "pytorch_model.bin", "")
    renamed = {
        k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
        for k, v in sd.items()
    }
    torch.save(renamed, tmp_path / "old" / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    report = init_text_tower(model, tmp_path / "old")
    assert torch.equal(model.text_model.embeddings.LayerNorm.bias, sd["embeddings.LayerNorm.bias"])
    assert len(report.filled) == 5 + 16 * t.num_hidden_layers


class RunsCode:
    """Pickles as a call of os.system: loading it with plain pickle would create the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("payload_at_top", [False, True])
def test_pickled_code_never_runs(model, tmp_path, legacy, payload_at_top):
    directory = tmp_path / "evil"
    write_hf_dir(directory, model.config.text, "pytorch_model.bin", "")
    marker = tmp_path / "marker"
    sd = random_tensors(hf_roberta_shapes(model.config.text))
    obj = RunsCode(marker) if payload_at_top else {**sd, "embeddings.extra": RunsCode(marker)}
    torch.save(obj, directory / "pytorch_model.bin", _use_new_zipfile_serialization=not legacy)
    before = snapshot(model)
    with pytest.raises(PretrainedInitError, match="not a (state dict|named tensor)"):
        init_text_tower(model, directory)
    assert not marker.exists()
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_text_errors(model, tmp_path):
    t = model.config.text
    write_hf_dir(tmp_path / "heads", t, "model.safetensors", "", num_attention_heads=8)
    with pytest.raises(PretrainedInitError, match="num_attention_heads: file 8 vs model 4"):
        init_text_tower(model, tmp_path / "heads")
    wide = dataclasses.replace(t, intermediate_size=128)
    write_hf_dir(tmp_path / "wide", wide, "model.safetensors", "")
    (tmp_path / "wide" / "config.json").write_text(json.dumps(dataclasses.asdict(t)))  # config says it fits
    with pytest.raises(PretrainedInitError, match=r"intermediate.dense.weight: file \(128, 64\) vs model"):
        init_text_tower(model, tmp_path / "wide")
    (tmp_path / "vit").mkdir()
    (tmp_path / "vit" / "config.json").write_text("{}")
    save_safetensors(random_tensors(timm_vit_shapes(model.config.video)), tmp_path / "vit" / "model.safetensors")
    with pytest.raises(PretrainedInitError, match="not a RoBERTa"):
        init_text_tower(model, tmp_path / "vit")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PretrainedInitError, match="no config.json"):
        init_text_tower(model, tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(PretrainedInitError, match="no weights file"):
        init_text_tower(model, tmp_path / "empty")


def test_legacy_storage_larger_than_the_file_is_refused_before_allocation(tmp_path):
    path = tmp_path / "bomb.pth"
    torch.save({"a": torch.zeros(4)}, path, _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    # the storage's element count (BININT1 4, then NONE for "no view") grown to 2**40 (LONG1): 4 TiB of float32
    assert data.count(b"K\x04N") == 1
    path.write_bytes(data.replace(b"K\x04N", b"\x8a\x06" + (2**40).to_bytes(6, "little") + b"N"))
    with pytest.raises(PretrainedInitError, match="more than the file holds"):
        read_state_dict(path)


@pytest.mark.parametrize("header_bytes", [0x80, 0x1F80, 0x7B])
def test_safetensors_detected_whatever_its_header_length(tmp_path, header_bytes):
    from safetensors.torch import save

    data = save({"a": torch.zeros(3)})
    n = int.from_bytes(data[:8], "little")
    assert header_bytes >= n
    header = data[8 : 8 + n] + b" " * (header_bytes - n)  # JSON padded with spaces, as the format allows
    path = tmp_path / "x.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + data[8 + n :])
    assert torch.equal(read_state_dict(path)["a"], torch.zeros(3))


def test_truncated_files_are_clear_errors(tmp_path):
    sd = {"a": torch.randn(1000)}
    for legacy in (False, True):
        path = tmp_path / f"t{legacy}.pth"
        torch.save(sd, path, _use_new_zipfile_serialization=not legacy)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) - 500])
        with pytest.raises(PretrainedInitError):
            read_state_dict(path)


# -- base size, on the meta device -------------------------------------------------------------------------------
def test_base_size_names_and_shapes_match_vit_b16_and_roberta_base():
    config = EgoVLPv2Config.base(num_frames=4)
    with torch.device("meta"):
        model = EgoVLPv2(config)
        vit = {k: torch.empty(s) for k, s in timm_vit_shapes(config.video).items()}
        roberta = {k: torch.empty(s) for k, s in hf_roberta_shapes(config.text).items()}
    assert vit["pos_embed"].shape == (1, 197, 768) and roberta["embeddings.word_embeddings.weight"].shape[0] == 50265
    video = fill_by_name(model, "video_model.", vit, "video", "ViT-B/16", VIDEO_OWN_INIT)
    assert len(video.filled) == 4 + 12 * 12 + 2 and video.ignored == ["head.bias", "head.weight"]
    assert all(any(p in k for p in NON_VIT_KEYS) for k in video.left_at_init) and not video.missing_from_file
    text = fill_by_name(model, "text_model.", roberta, "text", "roberta-base", TEXT_OWN_INIT)
    assert len(text.filled) == 5 + 12 * 16 and text.ignored == ["pooler.dense.bias", "pooler.dense.weight"]
    assert len(text.left_at_init) == 6 * (8 + 1)  # 6 fused layers: q, k, v, out (weight + bias) and the gate
    assert not text.missing_from_file


# -- the trainer's config keys -----------------------------------------------------------------------------------
def test_trainer_builds_a_new_model_from_pretrained_towers(tmp_path):
    """model.init_video / model.init_text: build_model fills the towers and hands back the reports train() prints;
    with init_from they are refused; with pretrained=False (a resume) nothing is read."""
    from egovlp_deploy.config import ConfigError
    from egovlp_deploy.trainer.config import TrainConfig
    from egovlp_deploy.trainer.train import build_model

    config = EgoVLPv2Config.tiny()
    vit = random_tensors(timm_vit_shapes(config.video), seed=5)
    save_safetensors(vit, tmp_path / "vit.safetensors")
    text, _ = write_hf_dir(tmp_path / "roberta", config.text, "model.safetensors", "roberta.")
    cfg = TrainConfig.from_dict(
        {
            "model": {
                "preset": "tiny",
                "init_video": str(tmp_path / "vit.safetensors"),
                "init_text": str(tmp_path / "roberta"),
            }
        }
    )
    reports = []
    model = build_model(cfg, 1000, reports)
    assert [len(r.filled) > 0 for r in reports] == [True, True]
    state = model.state_dict()
    assert torch.equal(state["video_model.blocks.0.attn.qkv.weight"], vit["blocks.0.attn.qkv.weight"])
    assert torch.equal(
        state["text_model.encoder.layer.0.attention.self.query.weight"],
        text["roberta.encoder.layer.0.attention.self.query.weight"],
    )
    untouched = build_model(cfg, 1000, reports := [], pretrained=False).state_dict()
    assert reports == [] and not torch.equal(
        untouched["video_model.blocks.0.attn.qkv.weight"], vit["blocks.0.attn.qkv.weight"]
    )
    with pytest.raises(ConfigError, match="init_from"):
        TrainConfig.from_dict({"model": {"preset": "tiny", "init_from": "x.pth", "init_video": "vit.pth"}})


# -- parity with the official loading code -----------------------------------------------------------------------
# Golden values produced by running the official EgoVLPv2 loading code on random-weight files of the layouts above,
# at the tiny and base sizes (the official code's own sizes are its constructor arguments; its fused-layer indices
# were set to the same top `num_fuse_blocks` layers): the video tower built as its pre-training does
# (SpaceTimeTransformer with time_init='zeros', `head` and `pre_logits` replaced by nn.Identity, then
# state_dict_data_parallel_fix and load_state_dict(strict=False) on a timm .pth, plain and with `module.` names),
# and its fused RobertaModel.from_pretrained on a Hugging Face directory (with and without the `roberta.` prefix).
# Each entry: (count, sha256 of the sorted names joined by "\n") of the official parameter names (ours without the
# `video_model.` / `text_model.` prefix) that the official code filled from the file, and of those it left at its
# init. There, the filled values equalled the file's bit for bit, and the file's `head.*`, `pooler.dense.*` and
# `lm_head.*` filled nothing. (The official text model also holds a persistent `embeddings.position_ids` buffer,
# an arange whatever the file says; ours has no such buffer, so the text sets are of parameters only.)
OFFICIAL_GOLDEN = {
    ("video", "tiny"): {
        "filled": (54, "d9d6fb0cd433654e502a969e6f64b1242a437159d0b8e10ed0eb2537fa8f1191"),
        "left_at_init": (43, "76c0d783630d7c9dd0c54210c3d7517af0d51418d4aa34e857e45465b06b5919"),
    },
    ("video", "base"): {
        "filled": (150, "90642ba8810056d8cf9798abed5bad2433f0a7a4eb837efec7a521653d8192f1"),
        "left_at_init": (127, "65465d07fb5508e08a3f6e446cbfc394170304ae8962d8822b1720928e2ca1c3"),
    },
    ("text", "tiny"): {
        "filled": (69, "fa0ce8d4df1d02aba9df88669e90173af952afa4f69f7a8ea4063fb34170df40"),
        "left_at_init": (18, "817aeea60a58061ad104e30f980d189151ca9d0a6ef8e1ddd9d0e7665f43eb38"),
    },
    ("text", "base"): {
        "filled": (197, "0d89fc851e19f1d19cc4412a106e63a373e835d2eb192fb95926b55cbf9e6561"),
        "left_at_init": (54, "5dd44b3044a9018ccb2f346d70b561d2cf0220cf4a2954771f2e7db5c5d09a9d"),
    },
}
# The constant values the official constructors give the video parameters left at init (the others there keep
# torch's default Linear init); the text gates alpha_t2i start at 0 and keep it (_init_weights skips them).
OFFICIAL_VIDEO_CONSTANT_INIT = {
    "norm3.weight": 1.0,
    "norm3.bias": 0.0,
    "timeattn.qkv.weight": 0.0,
    "timeattn.qkv.bias": 0.0,
    "timeattn.proj.weight": 1.0,
    "timeattn.proj.bias": 0.0,
    "attn.alpha_i2t": 0.0,
    "attn.norm_i2t_i.weight": 1.0,
    "attn.norm_i2t_i.bias": 0.0,
    "temporal_embed": 0.0,
}


def name_digest(names, prefix):
    import hashlib

    stripped = sorted(n[len(prefix) :] for n in names)
    return len(stripped), hashlib.sha256("\n".join(stripped).encode()).hexdigest()


def check_golden(report, tower, size):
    prefix = tower + "_model."
    golden = OFFICIAL_GOLDEN[(tower, size)]
    assert name_digest(report.filled, prefix) == golden["filled"]
    assert name_digest(report.left_at_init, prefix) == golden["left_at_init"]


def test_video_init_matches_the_official_loading(tmp_path):
    config = EgoVLPv2Config.tiny()
    sd = random_tensors(timm_vit_shapes(config.video), seed=11)
    torch.save(sd, tmp_path / "vit.pth")
    torch.save({"module." + k: v for k, v in sd.items()}, tmp_path / "module.pth", _use_new_zipfile_serialization=False)
    save_safetensors(sd, tmp_path / "vit.safetensors")
    for name in ("vit.pth", "module.pth", "vit.safetensors"):
        torch.manual_seed(0)
        model = EgoVLPv2(config)
        report = init_video_tower(model, tmp_path / name)
        check_golden(report, "video", "tiny")
        state = model.state_dict()
        for key in report.filled:
            assert torch.equal(state[key], sd[key[len("video_model.") :]]), key
        for key in report.left_at_init:
            constant = [c for suffix, c in OFFICIAL_VIDEO_CONSTANT_INIT.items() if key.endswith(suffix)]
            if constant:
                assert torch.equal(state[key], torch.full_like(state[key], constant[0])), key
    base = EgoVLPv2Config.base(num_frames=4)
    with torch.device("meta"):
        model = EgoVLPv2(base)
        vit = {k: torch.empty(s) for k, s in timm_vit_shapes(base.video).items()}
    check_golden(fill_by_name(model, "video_model.", vit, "video", "ViT-B/16", VIDEO_OWN_INIT), "video", "base")


def test_text_init_matches_the_official_loading(tmp_path):
    config = EgoVLPv2Config.tiny()
    for weights_name, prefix in (("model.safetensors", "roberta."), ("pytorch_model.bin", "")):
        directory = tmp_path / weights_name
        sd, _ = write_hf_dir(directory, config.text, weights_name, prefix, seed=12)
        torch.manual_seed(0)
        model = EgoVLPv2(config)
        report = init_text_tower(model, directory)
        check_golden(report, "text", "tiny")
        state = model.state_dict()
        for key in report.filled:
            assert torch.equal(state[key], sd[prefix + key[len("text_model.") :]]), key
        for key in report.left_at_init:
            if key.endswith("alpha_t2i"):
                assert state[key].item() == 0.0, key
    base = EgoVLPv2Config.base(num_frames=4)
    with torch.device("meta"):
        model = EgoVLPv2(base)
        roberta = {k: torch.empty(s) for k, s in hf_roberta_shapes(base.text, "roberta.").items()}
    roberta = {k[len("roberta.") :]: v for k, v in roberta.items()}  # as init_text_tower strips the prefix
    check_golden(fill_by_name(model, "text_model.", roberta, "text", "roberta-base", TEXT_OWN_INIT), "text", "base")


# -- files nobody here made ----------------------------------------------------------------------------------------
class ShadowedItems(collections.OrderedDict):
    """Pickles as an OrderedDict whose instance attributes `items`, `values` and `get` shadow its methods."""

    def __reduce__(self):
        state = {"items": 5, "values": 5, "get": 5}
        return collections.OrderedDict, (), state, None, iter(collections.OrderedDict.items(self))


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("nested", [False, True])
def test_state_dict_with_shadowed_methods_loads(model, tmp_path, legacy, nested):
    sd = random_tensors(timm_vit_shapes(model.config.video))
    obj = {"model": ShadowedItems(sd), "epoch": 3} if nested else ShadowedItems(sd)
    torch.save(obj, tmp_path / "vit.pth", _use_new_zipfile_serialization=not legacy)
    report = init_video_tower(model, tmp_path / "vit.pth")  # the attributes are data, never methods we call
    assert torch.equal(model.video_model.pos_embed, sd["pos_embed"]) and len(report.filled) == 54


def test_legacy_storage_missing_from_the_key_list_is_refused(tmp_path):
    """A storage the pickle names but the key list after it leaves out is never filled: its tensor would hold
    whatever the memory held."""
    path = tmp_path / "two.pth"
    torch.save({"a": torch.arange(100.0), "b": torch.arange(100.0, 200.0)}, path, _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    f = io.BytesIO(data)
    for _ in range(4):  # magic, protocol, sys info, the state dict
        for _ in pickletools.genops(f):
            pass
    start = f.tell()
    keys = pickle.load(f)  # a list of str, written by torch.save just above
    assert len(keys) == 2
    path.write_bytes(data[:start] + pickle.dumps(keys[:1], protocol=2) + data[f.tell() :])  # file size kept
    with pytest.raises(PretrainedInitError, match=rf"truncated checkpoint .*two\.pth: storage {keys[1]} is missing"):
        read_state_dict(path)


@pytest.mark.parametrize("bad", ["int16", "nan", "inf"])
def test_integer_or_non_finite_weights_are_refused_and_change_nothing(model, tmp_path, bad):
    sd = random_tensors(timm_vit_shapes(model.config.video))
    if bad == "int16":
        sd["blocks.0.mlp.fc1.weight"] = (sd["blocks.0.mlp.fc1.weight"] * 1000).to(torch.int16)
    else:
        sd["blocks.0.mlp.fc1.weight"][3, 1] = float(bad)
    torch.save(sd, tmp_path / "vit.pth")
    before = snapshot(model)
    expected = "file torch.int16 vs model video_model.blocks.0.mlp.fc1.weight" if bad == "int16" else "NaN or infinite"
    with pytest.raises(PretrainedInitError, match=rf"vit\.pth cannot fill the video tower: .*fc1\.weight: {expected}"):
        init_video_tower(model, tmp_path / "vit.pth")
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def npy_header(shape) -> bytes:
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": shape})
    return header.getvalue()


def test_npz_array_larger_than_its_entry_is_refused_before_allocation(model, tmp_path):
    path = tmp_path / "lying.npz"  # 2**40 float32 (4 TiB) declared, 8 bytes stored
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("embedding/kernel.npy", npy_header((2**40,)) + bytes(8))
    with pytest.raises(PretrainedInitError, match=r"lying\.npz: embedding/kernel\.npy declares 4398046511104 bytes"):
        init_video_tower(model, path)


def test_npz_zip_bomb_is_refused_before_decompression(model, tmp_path):
    path = tmp_path / "bomb.npz"  # 128 MiB of zeros deflated to about 128 kB
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        with archive.open("embedding/kernel.npy", "w", force_zip64=True) as member:
            member.write(npy_header((2**25,)))
            for _ in range(128):
                member.write(bytes(1 << 20))
    assert path.stat().st_size < 1 << 20
    with pytest.raises(PretrainedInitError, match=r"bomb\.npz: embedding/kernel\.npy would unpack past 8x"):
        init_video_tower(model, path)


class BuiltThenChanged:
    """A tensor rebuilt within its storage, then given pickled state (BUILD) that sets requires_grad and hooks."""

    def __init__(self, tensor):
        self.tensor = tensor

    def __reduce__(self):
        args = (self.tensor.storage(), 0, (1,), (1,), False, collections.OrderedDict())
        return torch._utils._rebuild_tensor_v2, args, (True, None, {"hook": 1})


@pytest.mark.filterwarnings("ignore:TypedStorage is deprecated")
def test_legacy_pickled_state_applied_to_a_tensor_is_refused(tmp_path):
    torch.save({"w": BuiltThenChanged(torch.zeros(2))}, tmp_path / "built.pth", _use_new_zipfile_serialization=False)
    with pytest.raises(PretrainedInitError, match=r"built\.pth: malformed checkpoint: pickled state is applied"):
        read_state_dict(tmp_path / "built.pth")
