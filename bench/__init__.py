"""Benchmarks: scripts that measure on the sandbox and write bench/results/*.json."""

import json
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def write_figures(name: str, figures: dict) -> int:
    """Write bench/results/<name>.json and print the figures."""
    out = REPO / "bench" / "results" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    git = lambda *a: subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True).stdout.strip()  # noqa: E731
    figures = {"commit": git("rev-parse", "HEAD") + ("+changes" if git("status", "--porcelain", "--untracked-files=no") else ""),
               "measured": time.strftime("%Y-%m-%d %H:%M:%S"), **figures}
    out.write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures, indent=2))
    print(f"written to {out.relative_to(REPO)}")
    return 0


def place_homeserver(sn: str, host: str) -> None:
    """Point a benchmark's homeserver names at `host` and forget an earlier run's
    uninstall record there (it would refuse the deploy)."""
    from tests.e2e.helpers import on_host
    from tests.sandbox import sandbox as sb

    for name in (sn, f"matrix.{sn}"):
        sb.set_dns(name, sb.host_addr(host))
    on_host(host, f"rm -f /opt/matrix/.synapse-fabric/uninstalled/{sn}")


def drop_homeserver(sn: str, inventory: Path) -> None:
    """A benchmark's own homeserver off the sandbox again: uninstalled (no backup, the
    name typed on stdin) with `inventory`, and its sandbox DNS names removed."""
    import os
    import sys

    from tests.sandbox import sandbox as sb

    subprocess.run([str(Path(sys.executable).parent / "inv"), "uninstall", "--homeserver", sn, "--no-backup"],
                   cwd=REPO, input=f"{sn}\n", text=True, capture_output=True,
                   env={**os.environ, "INVOKE_INVENTORY": str(inventory)})
    for name in (sn, f"matrix.{sn}"):
        sb.set_dns(name, None)
