"""A tokenizer folder is data: its tokenizer_config.json may not make transformers run Python code from it."""

import builtins
import json
import shutil

import pytest

from egovlp_deploy.tokenizer import TokenizerError, load_tokenizer


def test_auto_map_code_in_the_folder_never_runs(demo_tokenizer_dir, tmp_path, monkeypatch):
    folder = tmp_path / "tok"
    shutil.copytree(demo_tokenizer_dir, folder)
    marker = tmp_path / "PWNED"
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("tokenizer_class", None)  # no class transformers knows: only the folder's module would do
    config["auto_map"] = {"AutoTokenizer": ["evil_tok.EvilTokenizer", "evil_tok.EvilTokenizer"]}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "evil_tok.py").write_text(
        f"open({str(marker)!r}, 'w').write('x')\n"
        "from transformers import RobertaTokenizerFast\n"
        "class EvilTokenizer(RobertaTokenizerFast):\n    pass\n"
    )
    # transformers asks on stdin whether to run the folder's code: a user (or a pipe) answering "y" must not matter
    asked = []
    monkeypatch.setattr(builtins, "input", lambda *a: asked.append(a) or "y")
    with pytest.raises(TokenizerError, match="custom code"):
        load_tokenizer(folder)
    assert not asked
    assert not marker.exists()
