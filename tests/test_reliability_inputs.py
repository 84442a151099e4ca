"""Bad options and hostile inputs: each is refused with the option, file or entry named, before any damage.

Each reproduction passed silently (or failed far from its cause) before ``mxq.options``, ``mxq.io.owned``
and ``mxq.io.paths``: ``--layers 0`` wrote 4 layers, ``--shard-gb 0/-1`` was accepted, ``--overwrite`` deleted
any folder, ``batch_size=0`` was a ZeroDivisionError, ``max_new_tokens=-5`` said "KV cache full",
``device=cuda`` without a GPU an AttributeError, a binary calibration file a bare UnicodeDecodeError, and
manifest entries such as ``../../x`` were stat-ed and hashed outside the checkpoint.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

import mxq
from mxq.calib import CalibError
from mxq.io.owned import NotOwnedError
from mxq.io.safetensors_io import CheckpointError
from mxq.options import OptionError, check_run_options
from mxq.run import RECIPES


def cfg_with(*overrides: str):
    with initialize_config_dir(config_dir=RECIPES, version_base=None):
        return compose("run", overrides=list(overrides))


@pytest.fixture(scope="module")
def ckpt(make_ckpt):
    return make_ckpt("mxfp4", layers=1)


@pytest.mark.parametrize("override,named", [
    ("batch_size=0", "batch_size=0"),
    ("generate.max_new_tokens=-5", "generate.max_new_tokens=-5"),
    ("eval.perplexity.batch_size=0", "eval.perplexity.batch_size=0"),
    ("device=tpu", "device='tpu'"),
])
def test_bad_run_option_is_named(override, named):
    with pytest.raises(OptionError) as e:
        check_run_options(cfg_with("eval=quick", override))
    assert str(e.value).startswith(named)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_cuda_without_gpu_is_named():
    with pytest.raises(OptionError, match=r"device='cuda'.*no CUDA GPU"):
        check_run_options(cfg_with("device=cuda"))


@pytest.mark.parametrize("argv,flag", [(["--layers", "0"], "--layers"), (["--layers", "-2"], "--layers")])
def test_synth_rejects_non_positive_layers(tmp_path, capsys, argv, flag):
    from mxq.synth import main

    with pytest.raises(SystemExit):
        main([str(tmp_path / "out"), *argv])
    assert flag in capsys.readouterr().err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", ["0", "-1", "nan"])
def test_dequantize_rejects_non_positive_shard_size(ckpt, tmp_path, capsys, value):
    from mxq.dequantize import main

    with pytest.raises(SystemExit):
        main([str(ckpt), str(tmp_path / "out"), "--shard-gb", value])
    assert "--shard-gb" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_overwrite_refuses_a_folder_mxq_did_not_write(ckpt, tmp_path):
    from mxq.dequantize import dequantize
    from mxq.synth import synth

    user = tmp_path / "papers"
    user.mkdir()
    (user / "draft.tex").write_text("precious")
    with pytest.raises(NotOwnedError, match="draft.tex"):
        synth(user, "tiny", overrides={"num_hidden_layers": 1}, overwrite=True)
    with pytest.raises(NotOwnedError, match="draft.tex"):
        dequantize(ckpt, user, overwrite=True)
    assert (user / "draft.tex").read_text() == "precious"
    # a checkpoint mxq wrote is replaced; a user file dropped into it makes it not mxq's any more
    out = synth(tmp_path / "ck", "tiny", overrides={"num_hidden_layers": 1})
    synth(out, "tiny", seed=1, overrides={"num_hidden_layers": 1}, overwrite=True)
    (out / "notes.md").write_text("mine")
    with pytest.raises(NotOwnedError, match="notes.md"):
        synth(out, "tiny", overrides={"num_hidden_layers": 1}, overwrite=True)
    assert (out / "notes.md").exists()


def test_binary_calibration_file_is_named(tmp_path):
    from mxq.calib.config import CalibConfig
    from mxq.calib.sources import file_texts

    blob = tmp_path / "weights.txt"
    blob.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(CalibError, match="weights.txt.*not UTF-8"):
        file_texts(CalibConfig(source="files", paths=(str(blob),)))
    nul = tmp_path / "nul.jsonl"
    nul.write_bytes(b'{"text": "a"}\n\x00\x00\x00')
    with pytest.raises(CalibError, match="nul.jsonl.*NUL"):
        file_texts(CalibConfig(source="files", paths=(str(nul),)))
    garbled = tmp_path / "rows.jsonl"
    garbled.write_text('{"text": "a"}\n{"text": \n')
    with pytest.raises(CalibError, match=r"rows.jsonl:2"):
        file_texts(CalibConfig(source="files", paths=(str(garbled),)))


@pytest.fixture(scope="module")
def mxq_ckpt(ckpt, tmp_path_factory):
    from mxq.io.targets import export_checkpoint
    from mxq.plan import Plan

    cfg = mxq.io.open_checkpoint(ckpt).config
    out = tmp_path_factory.mktemp("mxqlayout") / "nvfp4"
    return export_checkpoint(ckpt, Plan.uniform(cfg.num_hidden_layers, cfg.num_local_experts, "nvfp4"), out)


@pytest.mark.parametrize("entry", ["../secret.safetensors", "/etc/hostname", "sub/../../secret.safetensors",
                                   "link.safetensors"])
def test_manifest_paths_stay_inside_the_checkpoint(mxq_ckpt, tmp_path, entry, monkeypatch):
    from mxq.io import mxq_layout

    work = tmp_path / "ck"
    shutil.copytree(mxq_ckpt, work)
    outside = tmp_path / "secret.safetensors"
    outside.write_bytes(b"outside")
    if entry == "link.safetensors":
        (work / entry).symlink_to(outside)
    m = json.loads((work / "mxq_manifest.json").read_text())
    m["files"][entry] = {"bytes": 7, "sha256": "0" * 64}
    (work / "mxq_manifest.json").write_text(json.dumps(m))
    touched: list[Path] = []
    real = mxq_layout.sha256
    monkeypatch.setattr(mxq_layout, "sha256", lambda p: touched.append(Path(p)) or real(p))
    with pytest.raises(CheckpointError, match="outside"):
        mxq.load_model(work)
    with pytest.raises(CheckpointError, match="outside"):
        mxq_layout.verify(work)
    assert touched == []                         # refused before hashing anything


def test_manifest_of_a_clean_export_still_loads_and_verifies(mxq_ckpt):
    from mxq.io.mxq_layout import verify

    verify(mxq_ckpt)
    assert mxq.load_model(mxq_ckpt).config.num_hidden_layers == 1


@pytest.mark.parametrize("name,why", [
    ("", "not a plain relative path"), (None, "not a plain relative path"), (3, "not a plain relative path"),
    ("a\x00b.safetensors", "not a plain relative path"), ("..\\x.safetensors", "not a plain relative path"),
    ("/abs.safetensors", "points outside"), ("../x.safetensors", "points outside"),
    ("sub/../model.safetensors", "points outside"),            # even when it would land inside: no '..' at all
])
def test_confined_rejects_every_non_plain_entry(tmp_path, name, why):
    from mxq.io.paths import confined

    with pytest.raises(CheckpointError, match=f"mxq_manifest.json: file entry .*{why}"):
        confined(tmp_path, name, tmp_path / "mxq_manifest.json")
    assert confined(tmp_path, "original/model.safetensors", tmp_path / "m.json") == tmp_path / "original" / "model.safetensors"


def test_replaceable_rules(tmp_path):
    from mxq.io.owned import check_replaceable

    ck = tmp_path / "ck"
    (ck / "original").mkdir(parents=True)
    for f in ("config.json", "model.safetensors", "original/config.json", "original/model.safetensors"):
        (ck / f).write_text("x")
    check_replaceable(ck)                                                   # original/ is searched, and clean
    (ck / "original" / "notes.txt").write_text("mine")
    with pytest.raises(NotOwnedError,
                       match=r"original/notes.txt is not a file mxq writes.*\(1 such entry\); remove the folder yourself"):
        check_replaceable(ck)
    (ck / "original" / "notes.txt").unlink()
    (ck / "original" / "original").mkdir()                                 # only one level of original/
    with pytest.raises(NotOwnedError, match=r"original/original is not a file mxq writes"):
        check_replaceable(ck)
    (ck / "original" / "original").rmdir()
    (ck / "data").mkdir()                                                   # any other folder is foreign
    (ck / "extra.bin").write_text("x")
    with pytest.raises(NotOwnedError, match=r"data is not a file mxq writes.*\(2 such entries\)"):
        check_replaceable(ck)
    (ck / "data").rmdir()
    (ck / "extra.bin").unlink()
    (ck / "tokenizer.json").symlink_to(tmp_path / "elsewhere.json")       # a link is never mxq's
    with pytest.raises(NotOwnedError, match="tokenizer.json"):
        check_replaceable(ck)
    (ck / "tokenizer.json").unlink()
    (ck / "config.json").unlink()
    with pytest.raises(NotOwnedError, match="no config.json, so it is not a checkpoint"):
        check_replaceable(ck)
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(NotOwnedError, match="exists and is not a folder"):
        check_replaceable(f)
    (tmp_path / "link").symlink_to(ck)
    with pytest.raises(NotOwnedError, match="exists and is not a folder"):
        check_replaceable(tmp_path / "link")
    (tmp_path / "empty").mkdir()
    check_replaceable(tmp_path / "empty")
    check_replaceable(tmp_path / "absent")
