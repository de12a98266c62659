"""Refresh tests/constraints.txt against the newest releases, and keep it only if the suite passes.

    python scripts/refresh_constraints.py                 # newest of everything but torch
    python scripts/refresh_constraints.py --torch 2.14.1  # try another torch too

In a fresh virtual environment (a temporary folder) it installs torch at the given version, then
the package with its test extra and no constraints, so pip takes the newest release every range in
pyproject.toml allows. It runs the test suite there. On a pass it rewrites tests/constraints.txt
with what was installed and prints each version that moved; on a failure it leaves the file as it
was, writes the candidate to tests/constraints.candidate.txt and exits non-zero, so an upgrade
that breaks the project is seen here and never reaches CI.

torch is held at the version given (by default the one the file pins) because pip resolves an
unpinned torch to a multi-GB CUDA build on a CPU machine.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONSTRAINTS = ROOT / "tests" / "constraints.txt"
CANDIDATE = ROOT / "tests" / "constraints.candidate.txt"
HEADER = """\
# Known-good versions for the test and demo installs (pip install -c tests/constraints.txt ...).
# The package itself keeps ranges (pyproject.toml); this file pins what CI installs, so a new
# release elsewhere cannot change a test run. Refresh it on purpose: python scripts/refresh_constraints.py
"""


def pins(text: str) -> dict[str, str]:
    """name (lower case, '-' for '_') -> version, from `name==version` lines."""
    found = {}
    for line in text.splitlines():
        m = re.match(r"^([A-Za-z0-9_.-]+)==(\S+)$", line.strip())
        if m:
            found[m.group(1).lower().replace("_", "-")] = m.group(2)
    return found


def run(cmd: list[str], **kwargs) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, **kwargs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--torch", default=pins(CONSTRAINTS.read_text()).get("torch"),
                    help="torch version to install first (default: the one tests/constraints.txt pins)")
    ap.add_argument("--pytest-args", default="-q", help="arguments for the test run (default: -q)")
    args = ap.parse_args()
    if not args.torch:
        ap.error("tests/constraints.txt pins no torch: pass --torch VERSION")

    with tempfile.TemporaryDirectory(prefix="fluxtune-refresh-") as tmp:
        env_dir = Path(tmp) / "venv"
        venv.create(env_dir, with_pip=True)
        py = str(env_dir / "bin" / "python")
        run([py, "-m", "pip", "install", "-q", f"torch=={args.torch}"])
        run([py, "-m", "pip", "install", "-q", "-e", ".[test]"])
        frozen = subprocess.run([py, "-m", "pip", "freeze", "--exclude-editable"], check=True,
                                capture_output=True, text=True).stdout
        # "2.13.0+cpu": the local label names the build, which the constraint must not fix.
        lines = [re.sub(r"^(torch==[^+\s]+)\+\S+$", r"\1", line) for line in frozen.splitlines()
                 if "==" in line and not line.startswith("-e")]
        candidate = HEADER + "\n".join(sorted(lines, key=str.lower)) + "\n"
        tests = subprocess.run([py, "-m", "pytest", *args.pytest_args.split()], cwd=ROOT)

    old, new = pins(CONSTRAINTS.read_text()), pins(candidate)
    moved = sorted(name for name in old.keys() | new.keys() if old.get(name) != new.get(name))
    for name in moved:
        print(f"  {name}: {old.get(name, '-')} -> {new.get(name, '-')}")
    if not moved:
        print("no version moved")
    if tests.returncode != 0:
        CANDIDATE.write_text(candidate, encoding="utf-8")
        print(f"tests failed (exit {tests.returncode}) on the newest releases: {CONSTRAINTS.name} kept; "
              f"the versions tried are in {CANDIDATE.relative_to(ROOT)}", file=sys.stderr)
        return 1
    CONSTRAINTS.write_text(candidate, encoding="utf-8")
    CANDIDATE.unlink(missing_ok=True)
    print(f"tests passed: {CONSTRAINTS.relative_to(ROOT)} updated ({len(moved)} versions moved)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
