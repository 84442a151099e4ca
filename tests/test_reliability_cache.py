"""The statistics cache checks entries on read, computes once under a lock, and writes shareable modes.

Before ``mxq.cache_entry``: half a safetensors file or garbled JSON in an entry was a hit, then a bare
SafetensorError / JSONDecodeError naming no path on every later run; three concurrent runs on a cold cache
each computed the statistics; entries were 0700 folders holding a 0600 safetensors file.
"""
from __future__ import annotations

import importlib
import logging
import stat
import threading
import time
from pathlib import Path

import pytest
import torch

import mxq
from mxq.cache_entry import entry_lock, load_tensor_entry, save_tensor_entry
from mxq.stats import collect_or_load

collect_mod = importlib.import_module("mxq.stats.collect")
CALIB: dict = {}


@pytest.fixture(scope="module")
def setup(make_ckpt, tmp_path_factory):
    path = make_ckpt("mxfp4", layers=1)
    text = tmp_path_factory.mktemp("calib") / "austen.txt"
    text.write_text("It is a truth universally acknowledged, that a single man in possession of a good fortune. " * 20)
    CALIB.update(source="files", paths=[str(text)], num_sequences=4, seq_len=16)
    return mxq.load_model(path, dtype=torch.float32), mxq.load_tokenizer(path)


def entry_of(cache: Path) -> Path:
    (entry,) = [p for p in (cache / "router_stats").iterdir() if p.is_dir()]
    return entry


def collect_counting(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = collect_mod.collect

    def counting(*a, **kw):
        calls.append(1)
        time.sleep(0.3)                        # widen the window in which other runs could start computing
        return real(*a, **kw)

    monkeypatch.setattr(collect_mod, "collect", counting)
    return calls


@pytest.mark.parametrize("damage", ["truncate_safetensors", "garble_json", "drop_digests", "flip_a_byte"])
def test_damaged_entry_is_a_warned_miss_then_recomputed(setup, tmp_path, monkeypatch, caplog, damage):
    model, tok = setup
    cache = tmp_path / "cache"
    first = collect_or_load(model, tok, CALIB, tmp_path / "r1", cache, 2, plots=False, progress=False)
    entry = entry_of(cache)
    st, js = entry / "router_stats.safetensors", entry / "router_stats.json"
    if damage == "truncate_safetensors":
        st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    elif damage == "garble_json":
        js.write_text(js.read_text()[:-40] + "{{{")
    elif damage == "drop_digests":
        (entry / "entry.json").unlink()
    else:
        raw = bytearray(st.read_bytes())
        raw[-3] ^= 0x01                                            # a bit flip in the last tensor's data
        st.write_bytes(bytes(raw))
    calls = collect_counting(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="mxq.cache"):
        again = collect_or_load(model, tok, CALIB, tmp_path / "r2", cache, 2, plots=False, progress=False)
    assert calls == [1] and again.meta["cache"] == "miss"
    assert str(entry) in caplog.text and "damaged" in caplog.text
    torch.testing.assert_close(again.freq, first.freq)
    third = collect_or_load(model, tok, CALIB, tmp_path / "r3", cache, 2, plots=False, progress=False)
    assert third.meta["cache"] == "hit" and calls == [1]


def test_concurrent_misses_compute_once(setup, tmp_path, monkeypatch):
    """Three runs on one cold key: one collects under the lock, the other two wait and read its entry."""
    model, tok = setup
    cache = tmp_path / "cache"
    calls = collect_counting(monkeypatch)
    results, errors = {}, []

    def one(i: int) -> None:
        try:
            results[i] = collect_or_load(model, tok, CALIB, tmp_path / f"r{i}", cache, 2, plots=False, progress=False)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(calls) == 1
    assert sorted(r.meta["cache"] for r in results.values()) == ["hit", "hit", "miss"]
    for r in results.values():
        torch.testing.assert_close(r.reap, results[0].reap, equal_nan=True)


def test_cache_modes_are_shareable(setup, tmp_path):
    model, tok = setup
    cache = tmp_path / "cache"
    collect_or_load(model, tok, CALIB, tmp_path / "r1", cache, 2, plots=False, progress=False)
    entry = entry_of(cache)
    assert stat.S_IMODE(entry.stat().st_mode) == 0o755
    for p in [*entry.iterdir(), *(cache / "router_stats").glob("*.lock")]:
        assert stat.S_IMODE(p.stat().st_mode) == 0o644, p
    for p in (tmp_path / "r1").iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o644, p


def test_tensor_entry_checks_its_digest(tmp_path, caplog):
    path = tmp_path / "kl_ref" / "x.safetensors"
    save_tensor_entry(path, {"logprobs": torch.arange(12.0).reshape(3, 4)}, {"source": "s"})
    assert torch.equal(load_tensor_entry(path)["logprobs"], torch.arange(12.0).reshape(3, 4))
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x40
    path.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING, logger="mxq.cache"):
        assert load_tensor_entry(path) is None
    assert str(path) in caplog.text and not path.exists()
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    assert load_tensor_entry(path) is None


def test_lock_blocks_a_second_holder(tmp_path):
    lock_a, lock_b = entry_lock(tmp_path / "e"), entry_lock(tmp_path / "e", timeout=0.2)
    from filelock import Timeout

    with lock_a, pytest.raises(Timeout):
        lock_b.acquire()
    with lock_b:
        pass
