"""Convergence as a property, at length: many seeded sequences of inventory edits
and deploys (some killed mid-way), each checked against render
(tests/e2e/convergence.py). Writes bench/results/converge.json and prints it.

    .venv/bin/python -m bench.converge --sequences 100      # the sandbox up and bootstrapped
    .venv/bin/python -m bench.converge --seed 17             # replay one sequence
"""

from __future__ import annotations

import argparse
import time

from bench import write_figures


def main() -> int:
    from tests.e2e.convergence import run_sequence

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sequences", type=int, default=20, help="how many seeds (from --first)")
    ap.add_argument("--first", type=int, default=1000, help="the first seed")
    ap.add_argument("--seed", type=int, help="replay this seed only (nothing written)")
    ap.add_argument("--steps", type=int, default=6, help="edits per sequence")
    args = ap.parse_args()
    seeds = [args.seed] if args.seed is not None else list(range(args.first, args.first + args.sequences))
    started = time.monotonic()
    results = []
    for seed in seeds:
        outcome = run_sequence(seed, steps=args.steps)
        results.append(outcome)
        print(f"seed {seed}: {'ok' if outcome.ok else 'DIVERGED'} in {outcome.seconds:.0f}s")
        for line in outcome.steps + outcome.divergences:
            print("   ", line)
    if args.seed is not None:
        return 0 if results[0].ok else 1
    return write_figures("converge", {
        "sequences": len(results),
        "steps_per_sequence": args.steps,
        "deploys_killed_mid_way": sum("killed after" in s and "had finished" not in s for r in results for s in r.steps),
        "diverged": [{"seed": r.seed, "steps": r.steps, "divergences": r.divergences} for r in results if not r.ok],
        "minutes": round((time.monotonic() - started) / 60, 1),
    })


if __name__ == "__main__":
    raise SystemExit(main())
