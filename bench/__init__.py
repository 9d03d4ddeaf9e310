"""Benchmarks: scripts that measure on the sandbox and write bench/results/*.json."""

import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def write_figures(name: str, figures: dict) -> int:
    """Write bench/results/<name>.json and print the figures."""
    out = REPO / "bench" / "results" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures, indent=2))
    print(f"written to {out.relative_to(REPO)}")
    return 0
