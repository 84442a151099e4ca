"""mxq publish: a dry run lists the export's files and checks; damaged or card-less exports are refused."""
from __future__ import annotations

import pytest

from mxq.publish.hub import PublishError, check, main, plan_upload
from mxq.run import run
from tests.test_recipes import compose_cfg

FAST = ("eval=none", "calib.num_sequences=8", "calib.seq_len=64", "generate.max_new_tokens=0")


@pytest.fixture(scope="module")
def run_dir(make_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("pub") / "run"
    ckpt = make_ckpt("mxfp4", layers=2)
    run(compose_cfg("recipe=nf4", *FAST, f"model.path={ckpt}", f"cache_dir={out.parent / 'cache'}"), out)
    return out


def test_dry_run_lists_files_and_checks(run_dir, capsys):
    res = main([str(run_dir), "--repo-id", "me/tiny-nf4"])
    out = capsys.readouterr().out
    assert res["pushed"] is False and "dry run: nothing uploaded" in out
    names = [n for n, _ in res["files"]]
    assert "README.md" in names and "mxq_manifest.json" in names and names == sorted(names)
    assert dict(res["files"])["mxq_manifest.json"] == (run_dir / "model" / "mxq_manifest.json").stat().st_size
    assert any("SHA-256" in c for c in res["checks"]) and "base_model:" in out


def test_refusals(run_dir, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(run_dir, bad)
    shard = next((bad / "model").glob("*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1                                       # one flipped bit in the last tensor
    shard.write_bytes(bytes(data))
    with pytest.raises(PublishError, match="SHA-256|shard check failed"):
        check(bad)
    (bad / "model" / "README.md").unlink()
    with pytest.raises(PublishError, match="missing model card"):
        check(bad)
    (bad / ".incomplete").write_text("{}")
    with pytest.raises(PublishError, match="did not complete"):
        check(bad)
    with pytest.raises(SystemExit, match="refused"):
        main([str(bad), "--repo-id", "me/x"])
    assert plan_upload(run_dir)
