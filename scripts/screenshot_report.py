"""Screenshot a recare report with headless Chromium (Debian's `chromium` package), to look at it.

    python scripts/screenshot_report.py REPORT_DIR/report.html OUT.png [--width 1200] [--height 9000]

Not part of CI: a person (or a session) runs it and looks at every section of the picture.
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
