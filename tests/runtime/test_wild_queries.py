"""The runtime's Python API and its search / mcq commands on careless and hostile input: invisible or non-text
queries, terminal escapes in queries and labels, pixels or NaN instead of preprocessed clips, bad masks and token
ids, damaged index values, search counts that are not whole numbers, engines exported with a short text length,
and EgoMCQ files whose narration or videos cannot be used. Each is one clear error of the domain's type or a
result checked against an independent computation."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from egovlp_deploy.cli import main
from egovlp_deploy.data.errors import DataError
from egovlp_deploy.runtime import (
    EngineError,
    Hit,
    IndexFileError,
    IndexSettings,
    MomentIndex,
    QueryError,
    Runtime,
    build_index,
)
from egovlp_deploy.runtime.commands import format_hits
from egovlp_deploy.tokenizer import Truncation


@pytest.fixture(scope="module")
def rt(engines):
    return Runtime(engines)


@pytest.fixture(scope="module")
def index_dir(rt, video_root, tmp_path_factory):
    """vid_a (3.0 s) in 1-s windows every 0.5 s: 5 windows with fusion prefixes, in shards of 2, 2, 1."""
    idx = tmp_path_factory.mktemp("wild_index") / "idx"
    settings = IndexSettings(frames=4, window_sec=1.0, stride_sec=0.5, prefixes=True, commit_every=2)
    build_index(idx, [str(video_root / "vid_a" / "0.mp4")], rt, settings, progress=False)
    return idx


@pytest.fixture
def index_copy(index_dir, tmp_path):
    dst = tmp_path / "idx"
    shutil.copytree(index_dir, dst)
    return dst


def _edit_shard(path, change):
    """Rewrites one shard's tensors in place, keeping its metadata (the model and video it was written for)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path), metadata=metadata)


def _clips(rt, n=2, seed=0):
    return np.random.default_rng(seed).standard_normal((n, *rt.video_encoder.clip_shape)).astype(np.float32)


# -- text queries ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("query", ["\x00", "\x01\x02\x1f", "\u200b", "\ufeff\u200e", "\u202e\u2066"])
def test_a_query_with_no_visible_character_is_refused(rt, query):
    # the tokenizer turns each of these into byte tokens, so without the check they were searched as words
    assert len(rt.tokenizer(query)["input_ids"]) > 2
    with pytest.raises(QueryError, match="no visible character"):
        rt.text_encoder.encode([query])
    with pytest.raises(QueryError, match="no visible character"):
        rt.text_encoder.encode(["C picks up the cup", query])


def test_words_with_control_characters_between_them_are_encoded_as_given(rt):
    # only a query with nothing to show is refused; the tokenizer's own ids are the reference
    out = rt.text_encoder.encode(["C\x00cup", "!!!", "拿起杯子"])
    for row, text in enumerate(["C\x00cup", "!!!", "拿起杯子"]):
        ids = rt.tokenizer(text)["input_ids"]
        np.testing.assert_array_equal(out.input_ids[row, : len(ids)], ids)
        assert out.mask[row].sum() == len(ids)


@pytest.mark.parametrize(
    "texts, message",
    [
        (5, "queries must be a str or a list of str, got int"),
        (None, "queries must be a str or a list of str, got NoneType"),
        (b"C picks up the cup", "must be text \\(str\\), got bytes"),
        (["C picks up the cup", None], "query 1 must be text \\(str\\), got NoneType"),
        (["C picks up the cup", 3], "query 1 must be text \\(str\\), got int"),
    ],
)
def test_a_query_that_is_not_text_is_a_query_error(rt, texts, message):
    with pytest.raises(QueryError, match=message):
        rt.text_encoder.encode(texts)


def test_queries_as_a_tuple_or_numpy_array_equal_the_list(rt):
    texts = ["C picks up the cup", "C opens the drawer"]
    ref = rt.text_encoder.encode(texts)
    for given in (tuple(texts), np.array(texts)):
        out = rt.text_encoder.encode(given)
        np.testing.assert_array_equal(out.input_ids, ref.input_ids)
        np.testing.assert_array_equal(out.embedding, ref.embedding)


def test_truncation_message_cut_inside_a_character():
    # byte-level BPE splits an emoji into several tokens: the kept tokens decode to whole emoji + U+FFFD
    t = Truncation(text="🙂" * 20, tokens=82, limit=32, kept="🙂" * 7 + "\ufffd")
    assert t.message() == (
        'query truncated to 32 tokens: "🙂🙂🙂🙂🙂🙂🙂" (82 tokens given; not encoded: "' + "🙂" * 13 + '")'
    )


def test_truncation_message_shows_control_characters_as_escapes():
    text = "C \x1b[31mred\x1b[0m cup\nfake line \u202eevil"
    t = Truncation(text=text, tokens=40, limit=8, kept="C \x1b[31mred")
    assert t.message() == (
        'query truncated to 8 tokens: "C \\x1b[31mred" (40 tokens given; not encoded: '
        '"\\x1b[0m cup\\nfake line \\u202eevil")'
    )


def test_truncation_warning_of_the_encoder_has_no_raw_escape(rt):
    with pytest.warns(UserWarning, match="query truncated") as caught:
        rt.text_encoder.encode(["\x1b[2J C picks up the red cup " * 20])
    message = str(caught[0].message)
    assert "\x1b" not in message and "\\x1b[2J" in message


def test_search_lines_show_control_characters_as_escapes():
    hit = Hit(1, "/v/a.mp4", "a", "a.mp4", 0.0, 1.0, 0.5, 0.5, None, "#C C \x1b[2Jopens\nthe box")
    out = format_hits("C \x1b]0;pwned\x07 cup\nsecond", [hit])
    assert out.splitlines()[0] == '"C \\x1b]0;pwned\\x07 cup\\nsecond"'
    assert "[#C C \\x1b[2Jopens\\nthe box]" in out
    assert len(out.splitlines()) == 2 and "\x1b" not in out


# -- engines at a short text length ---------------------------------------------------------------------------------
def test_engines_exported_with_a_text_length_below_the_warmup_length(engines, tmp_path):
    """`export --max-text-len 4`: the manifest's text range is [1, 4]; the warm-up used 8 tokens and every text
    query failed with 'text_len is 8, outside the exported range'."""
    short = tmp_path / "engines_short"
    shutil.copytree(engines, short)
    manifest = json.loads((short / "manifest.json").read_text())
    manifest["export"]["max_text_len"] = 4
    for a in manifest["artifacts"]:
        if "text_len" in a["io"].get("dynamic", {}):
            a["io"]["dynamic"]["text_len"] = [1, 4]
    (short / "manifest.json").write_text(json.dumps(manifest))
    text = "C picks up the red cup"
    with pytest.warns(UserWarning, match="query truncated to 4 tokens"):
        out = Runtime(short).text_encoder.encode([text])
    reference = Runtime(engines)
    ids = np.array([reference.tokenizer(text, truncation=True, max_length=4)["input_ids"]], np.int64)
    want = reference.runner("text_encoder")(input_ids=ids, attention_mask=np.ones_like(ids))
    np.testing.assert_array_equal(out.input_ids, ids)
    np.testing.assert_allclose(out.embedding, want["text_embedding"], atol=1e-6)


# -- clips ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.uint8, np.int64, np.bool_, np.complex64])
def test_clips_that_are_not_float_are_refused(rt, dtype):
    clips = (np.abs(_clips(rt)) * 100).astype(dtype)  # e.g. raw uint8 pixels instead of normalised clips
    with pytest.raises(EngineError, match=f"preprocessed float arrays.*dtype {np.dtype(dtype)}"):
        rt.video_encoder.encode(clips)
    with pytest.raises(EngineError, match="preprocessed float arrays"):
        rt.video_encoder.fusion_prefix(clips)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_clips_with_nan_or_inf_are_refused(rt, bad):
    clips = _clips(rt)
    clips[1, 0, 0, 0, 0] = bad
    with pytest.raises(EngineError, match="1 of the .* values in clips are NaN or infinite"):
        rt.video_encoder.encode(clips)


def test_clip_inputs_of_other_float_types_and_layouts(rt):
    clips = _clips(rt, 3)
    ref = rt.video_encoder.encode(clips)
    np.testing.assert_allclose(rt.video_encoder.encode(clips.astype(np.float64)), ref, atol=1e-6)
    np.testing.assert_allclose(rt.video_encoder.encode(np.asfortranarray(clips)), ref, atol=1e-6)
    np.testing.assert_allclose(rt.video_encoder.encode(clips.tolist()), ref, atol=1e-6)
    # bfloat16 has no numpy dtype: the tensor is widened exactly, so it equals its float32 values
    bf16 = torch.from_numpy(clips).bfloat16()
    np.testing.assert_allclose(rt.video_encoder.encode(bf16), rt.video_encoder.encode(bf16.float().numpy()), atol=0)
    with pytest.raises(EngineError, match="clips must be one array"):
        rt.video_encoder.encode([clips[0].tolist(), [1.0, 2.0]])


# -- the fusion scorer --------------------------------------------------------------------------------------------
def test_score_prefixes_takes_one_clip_prefix_and_checks_its_inputs(rt):
    clips = _clips(rt, 3, seed=1)
    vp = rt.video_encoder.fusion_prefix(clips)
    t = rt.text_encoder.encode(["C picks up the cup"])
    three = rt.fusion.score_prefixes(vp, t.prefix[:1], t.mask[:1])
    np.testing.assert_allclose(rt.fusion.score_prefixes(vp[1], t.prefix[0], t.mask[0]), three[1:2], atol=1e-6)
    with pytest.raises(EngineError, match="attention_mask must hold only 0 and 1"):
        rt.fusion.score_prefixes(vp, t.prefix[:1], t.mask[:1] * 2)
    nan = vp.copy()
    nan[2, 0, 0] = np.nan
    with pytest.raises(EngineError, match="values in video_prefix are NaN or infinite"):
        rt.fusion.score_prefixes(nan, t.prefix[:1], t.mask[:1])
    with pytest.raises(EngineError, match=r"score_prefixes takes video_prefix \(K, T, Dv\)"):
        rt.fusion.score_prefixes(vp[None], t.prefix[:1], t.mask[:1])


def test_score_clips_refuses_ids_outside_the_vocabulary(rt):
    clips = _clips(rt, 2, seed=2)
    t = rt.text_encoder.encode(["C picks up the cup"])
    vocab = rt.folder.config.text.vocab_size
    for ids, message in (
        (t.input_ids[:1] * 0 + vocab, r"token ids in \[0, 1000\)"),
        (t.input_ids[:1] * 0 - 1, r"token ids in \[0, 1000\)"),
        (t.input_ids[:1] + 0.5, "integer token ids, got dtype float64"),
    ):
        with pytest.raises(EngineError, match=message.replace("1000", str(vocab))):
            rt.fusion.score_clips(clips, ids, t.mask[:1])
    # the monolithic pass equals the cached one on valid ids (the check does not change them)
    cached = rt.fusion.score_prefixes(rt.video_encoder.fusion_prefix(clips), t.prefix[:1], t.mask[:1])
    np.testing.assert_allclose(rt.fusion.score_clips(clips, t.input_ids[:1], t.mask[:1]), cached, atol=1e-5)


def test_torch_runner_gets_writable_arrays(engines, monkeypatch):
    """One text prefix is broadcast over K clips (a read-only view); with K = max_batch + 1 the last batch is a
    one-row view numpy calls contiguous, which torch.from_numpy warned about (and may not write to)."""
    rt = Runtime(engines, backend="torch")
    clips = _clips(rt, rt.max_batch + 1, seed=3)
    vp = rt.video_encoder.fusion_prefix(clips)
    t = rt.text_encoder.encode(["C picks up the cup"])
    seen = []
    from_numpy = torch.from_numpy

    def recording(x):
        seen.append(x.flags.writeable)
        return from_numpy(x)

    monkeypatch.setattr(torch, "from_numpy", recording)
    scores = rt.fusion.score_prefixes(vp, t.prefix[:1], t.mask[:1])
    monkeypatch.undo()
    assert seen and all(seen)
    ort = Runtime(engines).fusion.score_prefixes(vp, t.prefix[:1], t.mask[:1])  # another backend as the reference
    np.testing.assert_allclose(scores, ort, atol=1e-5)


# -- search -------------------------------------------------------------------------------------------------------
def test_search_scores_are_cosines_for_any_top_and_rerank(rt, index_dir):
    index = MomentIndex(index_dir)
    query = "C picks up the red cup"
    q = rt.text_encoder.encode([query]).embedding[0].astype(np.float64)
    cos = index.embeddings.astype(np.float64) @ q / np.linalg.norm(index.embeddings, axis=1) / np.linalg.norm(q)
    hits = index.search(rt, query, top=100)
    assert [h.rank for h in hits] == [1, 2, 3, 4, 5]
    np.testing.assert_allclose([h.score for h in hits], np.sort(cos)[::-1], atol=1e-6)
    reranked = index.search(rt, query, top=100, rerank=100)
    assert len(reranked) == 5 and all(h.vtm is not None for h in reranked)
    np.testing.assert_allclose([h.score for h in reranked], [h.dual + h.vtm for h in reranked], atol=1e-6)
    assert [h.score for h in reranked] == sorted((h.score for h in reranked), reverse=True)
    assert index.search(rt, query, top=np.int64(2))[1].rank == 2  # numpy integers are whole numbers too


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"top": True}, "--top must be a whole number, got True"),
        ({"top": 2.5}, "--top must be a whole number, got 2.5"),
        ({"top": "3"}, "--top must be a whole number, got '3'"),
        ({"top": 0}, "--top must be at least 1, got 0"),
        ({"rerank": 1.5}, "--rerank must be a whole number, got 1.5"),
        ({"rerank": -1}, r"--rerank must be 0 \(off\) or more, got -1"),
    ],
)
def test_search_counts_must_be_whole_numbers(rt, index_dir, kw, message):
    with pytest.raises(ValueError, match=message):
        MomentIndex(index_dir).search(rt, "C picks up the cup", **kw)


def test_top_zero_is_refused_when_the_command_line_is_read(index_dir, capsys):
    with pytest.raises(SystemExit) as exit:
        main(["search", str(index_dir), "C picks up the cup", "--top", "0"])
    assert exit.value.code == 2
    assert "argument --top: must be 1 or more, got 0" in capsys.readouterr().err


def test_tied_scores_keep_the_index_order(rt, index_copy):
    """Rows 0, 1 (shard 0) and 2 (shard 1) hold the same embedding and prefix: they score the same, and come out
    in the order of the index, with and without re-ranking, every time."""
    shards = index_copy / "shards"

    def same_as_row0(t, rows):
        for r in rows:
            t["embeddings"][r] = t["embeddings"][0]
            t["video_prefix"][r] = t["video_prefix"][0]

    row0 = load_file(str(shards / "00000-00000.safetensors"))
    _edit_shard(shards / "00000-00000.safetensors", lambda t: same_as_row0(t, [1]))

    def copy_row0(t):
        t["embeddings"][0] = row0["embeddings"][0]
        t["video_prefix"][0] = row0["video_prefix"][0]

    _edit_shard(shards / "00000-00001.safetensors", copy_row0)
    index = MomentIndex(index_copy)
    query = "C picks up the cup"
    for rerank in (0, 5):
        runs = [index.search(rt, query, top=5, rerank=rerank) for _ in range(3)]
        starts = [[h.start_sec for h in hits] for hits in runs]
        assert starts[0] == starts[1] == starts[2]
        tied = [h.start_sec for h in runs[0] if h.start_sec in (0.0, 0.5, 1.0)]
        assert tied == [0.0, 0.5, 1.0]  # windows 0, 1, 2 in index order
        assert len({h.score for h in runs[0] if h.start_sec in (0.0, 0.5, 1.0)}) == 1


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda t: t["embeddings"].__setitem__((1, 3), np.nan), "NaN or infinite embeddings"),
        (lambda t: t["embeddings"].__setitem__((0, 0), np.inf), "NaN or infinite embeddings"),
        (lambda t: t["embeddings"].__setitem__(1, t["embeddings"][1] * 1e30), "embeddings of norm 1e\\+30"),
        (lambda t: t.__setitem__("embeddings", (t["embeddings"] * 100).astype(np.int64)), "dtype int64"),
        (lambda t: t["timestamps"].__setitem__((0, 1), np.nan), "NaN or infinite timestamps"),
        (lambda t: t["timestamps"].__setitem__(0, [2.0, 1.0]), "a window that ends before it starts"),
    ],
)
def test_damaged_index_values_are_refused_naming_the_shard(rt, index_copy, change, message):
    """A NaN row sorted last (and wrote NaN into --json), an infinite one ranked first or turned every score
    into NaN, a row of norm 1e30 ranked first with a 'cosine' of 1e29."""
    shard = index_copy / "shards" / "00000-00000.safetensors"
    _edit_shard(shard, change)
    with pytest.raises(IndexFileError, match=f"00000-00000.safetensors: shard of .*vid_a.* holds .*{message}.*rerun"):
        MomentIndex(index_copy).search(rt, "C picks up the cup")


def test_rerunning_index_encodes_a_damaged_shard_again(rt, index_dir, index_copy, video_root):
    """What the error advises works: the same `index` run uncommits the damaged shard and the ones after it and
    encodes their windows again; the repaired index equals the undamaged one."""
    _edit_shard(index_copy / "shards" / "00000-00001.safetensors", lambda t: t["embeddings"].__setitem__(0, np.nan))
    settings = IndexSettings(frames=4, window_sec=1.0, stride_sec=0.5, prefixes=True, commit_every=2)
    summary = build_index(index_copy, [str(video_root / "vid_a" / "0.mp4")], rt, settings, progress=False)
    assert any(
        "encoding windows 2-4 again" in n["note"] and "NaN or infinite embeddings" in n["note"]
        for n in summary["notes"]
    )
    repaired, reference = MomentIndex(index_copy), MomentIndex(index_dir)
    np.testing.assert_allclose(repaired.embeddings, reference.embeddings, atol=1e-6)
    np.testing.assert_array_equal(repaired.timestamps, reference.timestamps)


def test_a_damaged_prefix_is_refused_when_re_ranking(rt, index_copy):
    _edit_shard(index_copy / "shards" / "00000-00001.safetensors", lambda t: t["video_prefix"].__setitem__(0, np.nan))
    index = MomentIndex(index_copy)  # prefixes are read per hit
    assert len(index.search(rt, "C picks up the cup", top=5)) == 5
    with pytest.raises(IndexFileError, match="00000-00001.safetensors: .* NaN, infinite or non-float video prefix"):
        index.search(rt, "C picks up the cup", top=5, rerank=5)


def test_labels_of_another_length_are_refused(rt, index_copy):
    data = json.loads((index_copy / "index.json").read_text())
    data["videos"][0]["labels"] = ["#C C opens the box"]  # 1 label, 5 windows: label(row 3) was an IndexError
    (index_copy / "index.json").write_text(json.dumps(data))
    with pytest.raises(IndexFileError, match=r"videos\[0\].labels is not a list of 5 texts"):
        MomentIndex(index_copy)


def test_non_finite_engine_outputs_are_not_ranked(rt, index_dir, monkeypatch):
    index = MomentIndex(index_dir)
    text = rt.text_encoder.encode(["C picks up the cup"])
    text.embedding[0, 0] = np.nan
    with pytest.raises(EngineError, match="text encoder returned NaN or infinite values"):
        index.search(rt, "C picks up the cup", text=text)
    monkeypatch.setattr(rt.fusion, "score_prefixes", lambda *a: np.array([0.5, np.nan, 0.4, 0.3, 0.2], np.float32))
    with pytest.raises(EngineError, match="fusion head returned NaN or infinite match scores"):
        index.search(rt, "C picks up the cup", rerank=5)


def test_empty_index_is_said_and_rerank_without_prefixes_refused(engines, rt, tmp_path, capsys):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video")
    idx = tmp_path / "empty_idx"
    build_index(idx, [str(bad)], rt, IndexSettings(frames=4), progress=False)
    index = MomentIndex(idx)
    assert len(index) == 0 and index.search(rt, "C picks up the cup") == []
    with pytest.raises(IndexFileError, match="built without fusion prefixes"):
        index.search(rt, "C picks up the cup", rerank=3)
    assert main(["search", str(idx), "C picks up the cup", "--engines", str(engines)]) == 0
    captured = capsys.readouterr()
    assert "holds no clips" in captured.err and captured.out.splitlines()[0] == '"C picks up the cup"'


# -- mcq ----------------------------------------------------------------------------------------------------------
def _questions(mcq_json, tmp_path, change):
    questions = json.loads(mcq_json.read_text())
    change(questions)
    path = tmp_path / "questions.json"
    path.write_text(json.dumps(questions))
    return path


def test_mcq_narration_with_nothing_visible_names_the_question(rt, mcq_json, video_root, tmp_path, monkeypatch):
    path = _questions(mcq_json, tmp_path, lambda q: q["1"]["query"].__setitem__("clip_text", "\u200b\u200b"))
    import egovlp_deploy.runtime.mcq as mcq

    monkeypatch.setattr(mcq, "read_egoclip_clip", lambda *a, **k: pytest.fail("a video was read"))
    with pytest.raises(DataError, match=r"questions.json: key '1': .*has no visible character"):
        mcq.answer_mcq(path, video_root, rt, progress=False)


def test_mcq_unreadable_video_names_the_question_and_choice(rt, mcq_json, video_root, tmp_path):
    root = tmp_path / "videos"
    shutil.copytree(video_root, root)
    (root / "vid_b" / "0.mp4").write_bytes(b"not a video at all")
    from egovlp_deploy.runtime.mcq import answer_mcq

    with pytest.raises(DataError, match=r"egomcq.json: key '0': choice 2, video vid_b: .*vid_b/0.mp4"):
        answer_mcq(mcq_json, root, rt, progress=False)


def test_mcq_out_never_replaces_the_questions_file(engines, mcq_json, video_root, tmp_path, capsys):
    path = tmp_path / "questions.json"
    shutil.copy(mcq_json, path)
    before = path.read_bytes()
    link = tmp_path / "answers.json"
    link.symlink_to(path)
    for out in (path, link):
        args = ["mcq", str(path), "--video-root", str(video_root), "--engines", str(engines), "--out", str(out)]
        assert main(args) == 2
        assert "is the questions file" in capsys.readouterr().err
    assert path.read_bytes() == before
