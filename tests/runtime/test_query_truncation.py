"""A query longer than the engines' text length is encoded truncated and said so once on stderr, in `search`,
`features --mode fusion` and `mcq` (the commands that tokenize text for the engines)."""

import json
import warnings

import pytest

from egovlp_deploy.cli import main
from egovlp_deploy.runtime import EngineFolder, IndexSettings, Runtime, build_index
from egovlp_deploy.runtime.engines import QueryTruncatedWarning

LONG = "#C C picks up the red cup from the table and puts it in the sink then opens the blue box " * 3
SHORT = "#C C opens the box"


def _truncations(err: str) -> list[str]:
    return [line for line in err.splitlines() if "query truncated to" in line]


def test_text_encoder_warns_once_per_query(engines):
    rt = Runtime(engines)
    limit = min(EngineFolder(engines).max_text_len, rt.folder.config.text.max_text_length)
    with pytest.warns(QueryTruncatedWarning, match=f'query truncated to {limit} tokens: "#C C picks up') as caught:
        out = rt.text_encoder.encode([LONG, SHORT, LONG])
    assert len([w for w in caught if w.category is QueryTruncatedWarning]) == 1
    assert out.input_ids.shape[1] == limit
    with warnings.catch_warnings():
        warnings.simplefilter("error", QueryTruncatedWarning)
        rt.text_encoder.encode([LONG, SHORT])  # already reported: no second warning


def test_a_long_lived_text_encoder_remembers_a_bounded_number_of_reported_queries(engines, monkeypatch):
    """A server's Runtime sees ever new queries: the reported ones are remembered up to WARNED_QUERIES (digests,
    oldest forgotten first), not one whole query string each for the process's life."""
    import egovlp_deploy.runtime.engines as engines_module

    monkeypatch.setattr(engines_module, "WARNED_QUERIES", 3)
    rt = Runtime(engines)
    queries = [f"{LONG} number {i}" for i in range(5)]
    with pytest.warns(QueryTruncatedWarning) as caught:
        rt.text_encoder.encode(queries)
    assert len([w for w in caught if w.category is QueryTruncatedWarning]) == 5
    assert len(rt.text_encoder._warned) == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error", QueryTruncatedWarning)
        rt.text_encoder.encode(queries[2:])  # the three newest: still remembered
    with pytest.warns(QueryTruncatedWarning):
        rt.text_encoder.encode(queries[:1])  # forgotten: said again


def test_search_features_and_mcq_say_it(engines, video_root, mcq_json, tmp_path, capsys):
    vid = str(video_root / "vid_c" / "0.mp4")
    idx = tmp_path / "idx"
    build_index(idx, [vid], Runtime(engines), IndexSettings(frames=4), progress=False)
    assert main(["search", str(idx), LONG, SHORT, LONG]) == 0
    lines = _truncations(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith("warning: query truncated to ")

    assert (
        main(
            [
                "features",
                vid,
                "--engines",
                str(engines),
                "--out",
                str(tmp_path / "feats"),
                "--mode",
                "fusion",
                "--query",
                LONG,
                "--query",
                SHORT,
                "--quiet",
            ]
        )
        == 0
    )
    assert len(_truncations(capsys.readouterr().err)) == 1

    questions = json.loads(mcq_json.read_text())
    questions["0"]["query"]["clip_text"] = LONG
    (tmp_path / "mcq.json").write_text(json.dumps(questions))
    assert (
        main(["mcq", str(tmp_path / "mcq.json"), "--video-root", str(video_root), "--engines", str(engines), "--json"])
        == 0
    )
    assert len(_truncations(capsys.readouterr().err)) == 1

    assert main(["search", str(idx), SHORT]) == 0
    assert _truncations(capsys.readouterr().err) == []
