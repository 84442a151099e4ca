"""N concurrent ``python -m mxq.run`` of one recipe on a cold statistics cache: collision-free and computed once.

Starts ``--runs`` processes at the same moment (same recipe, same cache, the default run-folder pattern under
``--work``), waits for all, then checks what the run-folder and cache guarantees promise:

* every run exits 0 in its own folder (the default names differ even when started in the same second);
* the router statistics were collected by exactly one run (one ``cache miss`` in all run.log files, the others
  ``cache hit`` after waiting on the entry's lock) and the cache holds one entry;
* every run exported the same bytes (SHA-256 of every file of ``model/``), and no folder is marked incomplete.

``python bench/concurrent_runs.py --runs 3 --work /tmp/conc`` prints a JSON summary (and writes it with
``--json``); exit status 1 if a check fails.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def tree_digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--work", type=Path, required=True, help="scratch folder (emptied first)")
    ap.add_argument("--recipe", default="prune_25pct")
    ap.add_argument("--extra", nargs="*", default=["eval=none", "generate.max_new_tokens=0",
                                                   "calib.num_sequences=16", "calib.seq_len=128"])
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    shutil.rmtree(a.work, ignore_errors=True)
    a.work.mkdir(parents=True)
    cache = a.work / "cache"
    pattern = str(a.work / "runs" / "${now:%Y-%m-%d}" / "${now:%H-%M-%S}_${hydra:runtime.choices.recipe}_${mxq_uid:}")
    cmd = [sys.executable, "-m", "mxq.run", f"recipe={a.recipe}", f"cache_dir={cache}", f"hydra.run.dir={pattern}",
           *a.extra]
    t0 = time.perf_counter()
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(a.runs)]
    outs = [p.communicate()[0] for p in procs]
    wall = time.perf_counter() - t0
    folders = sorted(p for p in (a.work / "runs").rglob("run_meta.json"))
    folders = [p.parent for p in folders]
    logs = "\n".join((f / "run.log").read_text() for f in folders if (f / "run.log").exists())
    exports = {str(f): tree_digest(f / "model") for f in folders if (f / "model").is_dir()}
    entries = [p for p in (cache / "router_stats").iterdir() if p.is_dir()] if (cache / "router_stats").is_dir() else []
    res = {
        "runs": a.runs, "recipe": a.recipe, "command": " ".join(cmd), "wall_s": round(wall, 1),
        "exit_codes": [p.returncode for p in procs],
        "run_folders": [str(f) for f in folders],
        "distinct_folders": len({str(f) for f in folders}),
        "incomplete_markers": sum((f / ".incomplete").exists() for f in folders),
        "stats_cache_misses": logs.count("router statistics: cache miss"),
        "stats_cache_hits": logs.count("router statistics: cache hit"),
        "cache_entries": len(entries),
        "exports_identical": len({json.dumps(d, sort_keys=True) for d in exports.values()}) == 1 and len(exports) == a.runs,
        "export_files": len(next(iter(exports.values()), {})),
    }
    ok = (res["exit_codes"] == [0] * a.runs and res["distinct_folders"] == a.runs and res["incomplete_markers"] == 0
          and res["stats_cache_misses"] == 1 and res["stats_cache_hits"] == a.runs - 1 and res["cache_entries"] == 1
          and res["exports_identical"])
    res["ok"] = ok
    text = json.dumps(res, indent=1)
    print(text)
    if a.json:
        a.json.write_text(text + "\n")
    if not ok:
        for o in outs:
            print(o[-3000:], file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
