"""What mxq writes: whole files or nothing, no leftovers after a kill, 0644 files and 0755 folders.

Before the shared writers in ``mxq.atomic``: every safetensors written through ``safetensors.save_file`` was
0600, cache folders 0700, and a SIGKILL during ``dequantize``/``synth`` left hidden ``.OUT.partial-*``
folders that nothing removed or reported. The write-failure tests pin down ``write_atomic``'s contract (a
plain in-place write passed the whole suite before).
"""
from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mxq import atomic
from mxq.atomic import save_safetensors_atomic, staged_dir, stale_partials, write_atomic

ROOT = Path(__file__).resolve().parents[1]


def modes(folder: Path) -> dict[str, int]:
    out = {".": stat.S_IMODE(folder.stat().st_mode)}
    for p in folder.rglob("*"):
        out[p.relative_to(folder).as_posix()] = stat.S_IMODE(p.stat().st_mode)
    return out


def assert_shareable(folder: Path) -> None:
    for name, mode in modes(folder).items():
        want = 0o755 if (folder / name).is_dir() else 0o644
        assert mode == want, f"{folder / name}: {oct(mode)} != {oct(want)}"


@pytest.fixture(autouse=True)
def default_umask():
    old = os.umask(0o022)
    yield
    os.umask(old)


# ------------------------------------------------------------------------------------------- write_atomic
@pytest.mark.parametrize("fail_at", ["write", "fsync", "replace"])
def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch, fail_at):
    path = tmp_path / "metrics.json"
    path.write_text("old")

    def boom(*a, **kw):
        raise OSError(f"disk full during {fail_at}")

    if fail_at == "write":
        real_fdopen = os.fdopen

        class HalfFile:
            def __init__(self, f):
                self.f = f

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.f.close()

            def write(self, raw):
                self.f.write(raw[: len(raw) // 2])      # half the bytes reach the disk, then the error
                self.f.flush()
                boom()

            def __getattr__(self, name):
                return getattr(self.f, name)

        monkeypatch.setattr(os, "fdopen", lambda fd, mode="r", *a, **kw: HalfFile(real_fdopen(fd, mode, *a, **kw)))
    else:
        monkeypatch.setattr(os, fail_at, boom)
    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, "new content " * 100)
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_write_atomic_replaces_whole_and_fsyncs(tmp_path, monkeypatch):
    synced: list[int] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real(fd))
    write_atomic(tmp_path / "a.txt", "x" * 10)
    write_atomic(tmp_path / "a.txt", b"yz")
    assert (tmp_path / "a.txt").read_bytes() == b"yz" and synced
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_save_safetensors_atomic_is_0644_and_whole(tmp_path, monkeypatch):
    path = tmp_path / "t.safetensors"
    save_safetensors_atomic(path, {"a": torch.ones(3)})
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("no space")))
    with pytest.raises(OSError):
        save_safetensors_atomic(path, {"a": torch.zeros(3)})
    from safetensors.torch import load_file

    assert torch.equal(load_file(str(path))["a"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.safetensors"]


def test_umask_is_respected(tmp_path):
    os.umask(0o077)
    write_atomic(tmp_path / "private.json", "{}")
    assert stat.S_IMODE((tmp_path / "private.json").stat().st_mode) == 0o600


# ------------------------------------------------------------------------------------------- folders
def test_staged_dir_is_all_or_nothing(tmp_path):
    out = tmp_path / "entry"
    with pytest.raises(RuntimeError), staged_dir(out) as tmp:
        (tmp / "half").write_text("x")
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    with staged_dir(out) as tmp:
        (tmp / "whole").write_text("x")
    assert_shareable(out)


def test_every_file_synth_and_dequantize_write_is_shareable(make_ckpt, tmp_path):
    from mxq.dequantize import dequantize

    src = make_ckpt("mxfp4", layers=1, with_original=True)
    assert_shareable(src)
    out = dequantize(src, tmp_path / "bf16")
    assert_shareable(out)


def test_run_folder_and_export_are_shareable(make_ckpt, tmp_path):
    from hydra import compose, initialize_config_dir

    from mxq.run import RECIPES, run

    ckpt = make_ckpt("mxfp4", layers=1)
    with initialize_config_dir(config_dir=RECIPES, version_base=None):
        cfg = compose("run", overrides=["recipe=prune_25pct", f"model.path={ckpt}", "eval=none",
                                        "calib.num_sequences=4", "calib.seq_len=16", "generate.max_new_tokens=1",
                                        f"cache_dir={tmp_path / 'cache'}"])
    run(cfg, tmp_path / "run")
    assert_shareable(tmp_path / "run")
    assert_shareable(tmp_path / "cache")


# ------------------------------------------------------------------------------------------- leftovers
def test_stale_partials_of_dead_writers_are_removed_live_ones_kept(tmp_path, caplog):
    out = tmp_path / "model"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".model.partial-{dead.pid}-deadbeef"
    live = tmp_path / f".model.partial-{os.getppid()}-cafe0000"
    other = tmp_path / f".other.partial-{dead.pid}-deadbeef"
    for p in (stale, live, other):
        p.mkdir()
        (p / "model.safetensors").write_bytes(b"x" * 100)
    assert stale_partials(out) == [stale]
    with staged_dir(out) as tmp:
        (tmp / "config.json").write_text("{}")
    assert not stale.exists() and live.exists() and other.exists()
    assert str(stale) in caplog.text


def test_sigkill_during_synth_leaves_a_partial_that_the_next_write_removes(tmp_path):
    """The reproduction: kill -9 mid-write, then write again to the same target."""
    out = tmp_path / "ck"
    code = ("import sys, time; from mxq.io import writer\n"
            "real = writer.write_unit_shards\n"
            "def slow(*a, **kw):\n"
            "    r = real(*a, **kw); print('written', flush=True); time.sleep(60); return r\n"
            "writer.write_unit_shards = slow\n"
            "from mxq.synth import main; main([sys.argv[1], '--layers', '1'])\n")
    p = subprocess.Popen([sys.executable, "-c", code, str(out)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "written"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    left = [q for q in tmp_path.iterdir() if q.name.startswith(".ck.partial-")]
    assert len(left) == 1 and not out.exists() and stale_partials(out) == left
    from mxq.synth import synth

    synth(out, "tiny", overrides={"num_hidden_layers": 1})
    assert sorted(q.name for q in tmp_path.iterdir()) == ["ck"]


def test_partial_names_carry_the_writer_pid(tmp_path):
    name = atomic.partial_name(tmp_path / "out").name
    assert name.startswith(f".out.partial-{os.getpid()}-")
    time.sleep(0)                                          # names differ between calls (random suffix)
    assert atomic.partial_name(tmp_path / "out").name != name


# ------------------------------------------------------------------------------------------- contracts in detail
def test_temp_file_sits_beside_the_target_with_a_recognisable_name(tmp_path, monkeypatch):
    """Same folder (the rename stays on one filesystem) and ``.NAME.PID.*.tmp`` (leftovers are attributable)."""
    seen: list[str] = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: seen.append(str(a)) or real(a, b))
    target = tmp_path / "deep" / "er" / "plan.json"                     # parents are created
    write_atomic(target, "{}")
    st = tmp_path / "new" / "er" / "s.safetensors"
    save_safetensors_atomic(st, {"a": torch.ones(1)}, {"k": "v"})
    for tmp, final in zip(seen, (target, st)):
        t = Path(tmp)
        assert t.name.startswith(f".{final.name}.{os.getpid()}.") and t.name.endswith(".tmp")
        assert t.parent == final.parent
    from safetensors import safe_open

    with safe_open(str(st), framework="pt") as f:
        assert f.metadata() == {"k": "v"}


def test_umask_fallback_without_proc(tmp_path, monkeypatch):
    real = Path.read_text

    def no_proc(self, *a, **kw):
        if str(self).startswith("/proc"):
            raise OSError("no /proc")
        return real(self, *a, **kw)

    monkeypatch.setattr(Path, "read_text", no_proc)
    os.umask(0o027)
    assert atomic.file_mode() == 0o640 and atomic.dir_mode() == 0o750
    assert os.umask(0o022) == 0o027                                      # left as it was


def test_staged_dir_replace_swaps_whole_and_refuses_without_replace(tmp_path):
    out = tmp_path / "entry"
    with staged_dir(out) as tmp:
        (tmp / "v").write_text("1")
    with pytest.raises(FileExistsError, match="entry: already exists"), staged_dir(out) as tmp:
        pass
    removed: list[Path] = []
    real_rmtree = atomic.shutil.rmtree
    with staged_dir(out, replace=True) as tmp:
        (tmp / "v").write_text("2")
        atomic.shutil.rmtree = lambda p, **kw: removed.append(Path(p)) or real_rmtree(p, **kw)
    atomic.shutil.rmtree = real_rmtree
    # the swapped-out folder is named so that a writer killed before deleting it leaves a removable leftover
    assert [atomic._PARTIAL.match(p.name)["kind"] for p in removed] == ["old"]
    assert (out / "v").read_text() == "2" and sorted(p.name for p in tmp_path.iterdir()) == ["entry"]
    tmp = atomic.partial_name(out)                       # finish_dir on a target that appeared meanwhile
    tmp.mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        atomic.finish_dir(tmp, out)
    assert not tmp.exists() and (out / "v").read_text() == "2"


def test_alive_rules(monkeypatch, tmp_path):
    assert atomic.pid_alive(os.getpid())
    mine = tmp_path / f".x.partial-{os.getpid()}-00"
    mine.mkdir()
    assert stale_partials(tmp_path / "x") == []                           # never our own

    def denied(pid, sig):
        raise PermissionError("another user's process")

    monkeypatch.setattr(os, "kill", denied)
    assert atomic.pid_alive(12345)                                           # exists, not ours: alive


def test_stale_partial_files_are_removed_and_named_with_their_pid(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    f = tmp_path / f".cfg.json.tmp-{dead.pid}-ab12"
    f.write_text("half")
    assert atomic.remove_stale_partials(tmp_path / "cfg.json") == [f]
    assert not f.exists() and f"pid {dead.pid}" in caplog.text
