"""``python -m mxq.train.select OUT_DIR``: train candidate schedules in parallel, ship the best on validation.

Why: the corpus is small (~4.2M training tokens) and the model memorises it within a few epochs, so the
schedule length and the regularisation decide the quality. Every candidate trains on the train split
*without* its ``calib`` slice (the last 256K characters of each domain's train split) and is scored by
its loss on that slice; held-out text plays no part in the choice. The winning candidate's checkpoint
folder is copied to ``OUT_DIR`` as is (``python -m mxq.train --exclude_calib true`` plus its flags, listed
in ``selection.json``, reproduces it), so the shipped model has never seen ``calib`` text either.

Candidates run as separate processes (``--parallel`` at a time): the tiny model leaves most of an H100
idle, so sharing it costs less than running one after another.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# TrainConfig overrides per candidate; qat_steps and warmup_steps are derived from steps when absent.
# These three produced the shipped model (candidate 2 won; mxq/assets/tiny/selection.json).
CANDIDATES: tuple[dict[str, Any], ...] = (
    {"steps": 800, "dropout": 0.0},
    {"steps": 1200, "dropout": 0.1},
    {"steps": 1600, "dropout": 0.2},
)


def _flags(cand: dict[str, Any], out_dir: Path, overrides: dict[str, Any]) -> list[str]:
    cfg = {"qat_steps": cand["steps"] // 10, "warmup_steps": min(200, cand["steps"] // 4), **overrides, **cand,
           "exclude_calib": True, "out_dir": str(out_dir)}
    flags = []
    for k, v in cfg.items():
        flags += [f"--{k}", json.dumps(v) if isinstance(v, (dict, list)) else str(v)]
    return flags


def _mean(d: dict[str, float]) -> float:
    return sum(d.values()) / len(d)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mxq.train.select", description=__doc__.splitlines()[0])
    ap.add_argument("out_dir")
    ap.add_argument("--work_dir", default="/tmp/mxq_select", help="one folder per candidate")
    ap.add_argument("--candidates", default=None, help="JSON list of TrainConfig overrides")
    ap.add_argument("--overrides", default="{}", help="JSON of TrainConfig fields for every candidate")
    ap.add_argument("--parallel", type=int, default=3)
    args = ap.parse_args(argv)
    t0 = time.time()
    cands = json.loads(args.candidates) if args.candidates else list(CANDIDATES)
    overrides = json.loads(args.overrides)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    runs = [(i, c, work / f"cand{i}") for i, c in enumerate(cands)]
    pending, active = list(runs), []
    while pending or active:
        while pending and len(active) < args.parallel:
            i, c, d = pending.pop(0)
            cmd = [sys.executable, "-m", "mxq.train", *_flags(c, d, overrides)]
            log = open(work / f"cand{i}.log", "w")
            active.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log, i))
        time.sleep(2)
        for proc, log, i in list(active):
            if proc.poll() is not None:
                log.close()
                active.remove((proc, log, i))
                print(f"[select] candidate {i} exited with {proc.returncode}", flush=True)
    results = []
    for i, c, d in runs:
        path = d / "training_log.json"
        if not path.is_file():
            continue
        log = json.loads(path.read_text())
        results.append({"candidate": i, "overrides": c, "flags": _flags(c, Path("OUT_DIR"), overrides),
                        "calib_loss": _mean(log["final"]["calib_loss"]),
                        "calib_by_domain": log["final"]["calib_loss"],
                        "train_s": log["timing"]["train_s"], "steps_done": log["timing"]["steps_done"]})
        print(f"[select] candidate {i} {c}: calib loss {results[-1]['calib_loss']:.4f}", flush=True)
    if not results:
        raise SystemExit("[select] no candidate finished")
    best = min(results, key=lambda r: r["calib_loss"])
    out = Path(args.out_dir)
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(work / f"cand{best['candidate']}", out)
    (out / "selection.json").write_text(json.dumps(
        {"validation": "calib slice, held out of training for every candidate", "candidates": results,
         "chosen": best["candidate"], "total_s": time.time() - t0}, indent=1) + "\n")
    print(f"[select] chosen candidate {best['candidate']} -> {out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
