#!/usr/bin/env python3
"""Footprint: what `pip install -r requirements.txt` puts on disk, measured in a fresh virtualenv.

    python bench/footprint.py [--requirements requirements.txt] [--keep]

It makes a new venv in a temporary directory (this interpreter's `-m venv`, like the container's
python:3.11-slim), installs the runtime requirements only, and measures its site-packages with `du`:
the total, the runtime dependencies alone (without pip, which every venv and the container image
already carry), and each installed distribution (the files its RECORD lists, .pyc included), largest
first. Target: runtime dependencies <= 250 MiB.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET_MIB = 250
BOOTSTRAP = {"pip", "setuptools", "wheel"}  # come with the venv (and the image), not with requirements.txt

# Runs inside the new venv: bytes on disk per distribution, from each one's RECORD.
PER_DISTRIBUTION = r"""
import json, os, sys
from importlib import metadata
site = next(p for p in sys.path if p.endswith("site-packages"))
out = {}
for dist in metadata.distributions(path=[site]):
    total, seen = 0, set()
    for f in dist.files or []:
        path = os.path.realpath(os.path.join(site, f))
        if path in seen or not os.path.isfile(path):
            continue
        seen.add(path)
        total += os.stat(path).st_blocks * 512  # on disk, like du
    out[dist.metadata["Name"]] = [dist.version, total]
print(json.dumps({"site": site, "dists": out}))
"""


def du_bytes(path: Path) -> int:
    """Disk usage of a directory, as `du -s` counts it."""
    return int(
        subprocess.run(
            ["du", "-s", "--block-size=1", str(path)], capture_output=True, text=True, check=True
        ).stdout.split()[0]
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requirements", default=str(ROOT / "requirements.txt"))
    parser.add_argument("--keep", action="store_true", help="keep the venv and print where it is")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="sb-footprint-"))
    try:
        venv = tmp / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        python = venv / "bin" / "python"
        pip = subprocess.run(
            [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", "-r", args.requirements],
            capture_output=True,
            text=True,
        )
        if pip.returncode:
            raise SystemExit(f"pip install failed:\n{pip.stdout}{pip.stderr}")
        found = json.loads(
            subprocess.run([str(python), "-c", PER_DISTRIBUTION], capture_output=True, text=True, check=True).stdout
        )
        site = Path(found["site"])
        total = du_bytes(site)
        dists = found["dists"]
        bootstrap = sum(size for name, (_, size) in dists.items() if name.lower() in BOOTSTRAP)
        runtime = total - bootstrap
        mib = 1024 * 1024
        print(f"fresh venv ({sys.version.split()[0]}), pip install -r {Path(args.requirements).name}\n")
        print(f"{'distribution':32}{'version':>12}{'MiB':>9}")
        for name, (version, size) in sorted(dists.items(), key=lambda item: -item[1][1]):
            mark = "  (comes with the venv)" if name.lower() in BOOTSTRAP else ""
            print(f"{name:32}{version:>12}{size / mib:9.1f}{mark}")
        print(f"\nsite-packages (du -s):              {total / mib:7.1f} MiB")
        print(f"runtime dependencies (without pip):  {runtime / mib:7.1f} MiB   target <= {TARGET_MIB} MiB")
        if args.keep:
            print(f"\nkept: {venv}")
        rows = [
            {
                "bench": "footprint",
                "case": "pip install -r requirements.txt",
                "metric": "runtime dependencies",
                "value": round(runtime / mib, 1),
                "unit": "MiB",
                "target": f"<= {TARGET_MIB}",
            }
        ]
        print("BENCH " + json.dumps(rows))
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
