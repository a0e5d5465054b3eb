"""Screenshot a recare report with headless Chromium (Debian's `chromium` package), to look at it.

    python scripts/screenshot_report.py REPORT_DIR/report.html OUT.png [--width 1200] [--height 9000] [--tile 1200]

Not part of CI: a person (or a session) runs it and looks at every section of the picture. With --tile N
the page is also cut into OUT-01.png, OUT-02.png, ... of N pixels each (small enough to look at one by
one); the blank bottom of the capture is dropped.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path, help="report.html")
    parser.add_argument("out", type=Path, help="PNG to write")
    parser.add_argument("--width", type=int, default=1200)
    parser.add_argument("--height", type=int, default=9000, help="page height to capture (pixels)")
    parser.add_argument("--tile", type=int, default=0, help="also cut the page into tiles of this height (pixels)")
    args = parser.parse_args()
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        print("error: no chromium found (apt-get install chromium)", file=sys.stderr)
        return 2
    if not args.report.is_file():
        print(f"error: {args.report} not found", file=sys.stderr)
        return 2
    command = [browser, "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars",
               f"--window-size={args.width},{args.height}", f"--screenshot={args.out.resolve()}",
               args.report.resolve().as_uri()]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if done.returncode != 0 or not args.out.is_file():
        print(f"error: chromium failed ({done.returncode}): {done.stderr[-2000:]}", file=sys.stderr)
        return 2
    print(f"screenshot written to {args.out}")
    if args.tile > 0:
        for path in cut_tiles(args.out, args.tile):
            print(f"tile written to {path}")
    return 0


def cut_tiles(path: Path, tile: int) -> list[Path]:
    """Cut the screenshot into tiles of `tile` pixels, from the top to the last non-white row."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        page = image.convert("RGB")
    rows = np.flatnonzero((np.asarray(page) < 250).any(axis=(1, 2)))
    bottom = int(rows[-1]) + 20 if rows.size else page.height
    paths = []
    for i, top in enumerate(range(0, min(bottom, page.height), tile)):
        out = path.with_name(f"{path.stem}-{i + 1:02d}{path.suffix}")
        page.crop((0, top, page.width, min(top + tile, bottom, page.height))).save(out)
        paths.append(out)
    return paths


if __name__ == "__main__":
    sys.exit(main())
