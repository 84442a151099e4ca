"""Render an mxq ``report.html`` in headless Chromium (Debian's ``chromium`` package) and save a PNG screenshot.

    python -m mxq.run -m recipe=baseline,nf4,prune_25pct eval.lm_eval.enabled=false hydra.sweep.dir=SWEEP
    python -m mxq.report SWEEP --html
    python docs/screenshot_report.py SWEEP/report.html docs/img/report.png

Checks the page the way a reader sees it (layout, tables, embedded plots). The PNG is reduced to a
256-colour palette so it stays small enough to keep in the repository.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
from pathlib import Path


def screenshot(page: Path, out: Path, width: int = 1200, height: int = 2400, max_bytes: int = 300_000) -> Path:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        raise SystemExit("chromium not found (Debian: apt-get install chromium)")
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.png"
        subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--user-data-dir={tmp}/profile", f"--window-size={width},{height}",
                        f"--screenshot={raw}", page.resolve().as_uri()],
                       check=True, capture_output=True, timeout=120)
        from PIL import Image

        img = Image.open(raw).convert("RGB")
        scale = 1.0
        while True:
            small = img.resize((int(img.width * scale), int(img.height * scale)), Image.LANCZOS) if scale < 1 else img
            out.parent.mkdir(parents=True, exist_ok=True)
            small.quantize(colors=256).save(out, optimize=True)
            if out.stat().st_size <= max_bytes or scale < 0.3:
                return out
            scale *= 0.85


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("page", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--width", type=int, default=1200)
    ap.add_argument("--height", type=int, default=2400)
    a = ap.parse_args()
    p = screenshot(a.page, a.out, a.width, a.height)
    print(f"{p}: {p.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
