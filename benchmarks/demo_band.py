"""The demo's band: its numbers over seeds and thread counts, against the lower edges it must hold.

A recipe that depends on the processor (the order of floating-point sums) or on the seed is on a
knife-edge; this script runs ``histo-wsl demo`` (the library's ``run_demo``, the full recipe) for
each seed of ``--seeds`` with each thread count of ``--threads`` (``torch.set_num_threads``), each in
its own child process, and prints one JSON object: a row per run (CAM and NEGEV PxAP on the
held-out patches, the slide's PxAP and Dice, seconds), the band (min and max of each) and whether
every run holds the lower edges that ``tests/synthetic/test_demo.py`` asserts for seed 0. Exit status 1 when
a run falls below an edge.

    python benchmarks/demo_band.py --seeds 0,1,2,3 --threads 1,2 --out /tmp/demo-band
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from histo_wsl.runtime.record import environment  # noqa: E402

#: the lower edges tests/synthetic/test_demo.py asserts on the full demo
EDGES = {"negev_pxap": 78.0, "gain": 60.0, "slide_pxap": 80.0, "slide_dice": 0.72}

CHILD = """
import json, sys, torch
from histo_wsl.synthetic.demo import RECIPE, run_demo
torch.set_num_threads(int(sys.argv[2]))
r = run_demo(sys.argv[1], seed=int(sys.argv[3]), overwrite=True, quiet=True, recipe=RECIPE)
print(json.dumps({"test": r["test"], "slide": r["slide_metrics"]}))
"""


def run_one(out: Path, threads: int, seed: int) -> dict:
    """One full demo in a child process; its numbers."""
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(out), str(threads), str(seed)],
        capture_output=True,
        text=True,
        check=True,
    )
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    test, slide = r["test"], r["slide"]
    return {
        "seed": seed,
        "threads": threads,
        "cam_pxap": round(test["cam_pxap"], 2),
        "negev_pxap": round(test["negev_pxap"], 2),
        "gain": round(test["negev_pxap"] - test["cam_pxap"], 2),
        "slide_pxap": round(slide["pxap"], 2),
        "slide_dice": round(slide["dice_fg@card"], 3),
        "seconds": round(time.perf_counter() - t0, 1),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", default="0,1,2,3", help="Comma-separated demo seeds.")
    p.add_argument("--threads", default="1,2", help="Comma-separated torch thread counts.")
    p.add_argument("--out", default="runs/demo-band", help="Folder of the demo runs.")
    args = p.parse_args()
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        for threads in [int(t) for t in args.threads.split(",")]:
            rows.append(run_one(Path(args.out) / f"seed{seed}-threads{threads}", threads, seed))
            print(json.dumps(rows[-1]), file=sys.stderr)
    band = {k: [min(r[k] for r in rows), max(r[k] for r in rows)] for k in EDGES}
    held = all(r[k] >= edge for r in rows for k, edge in EDGES.items())
    print(
        json.dumps(
            {
                "machine": environment(),
                "runs": rows,
                "band": band,
                "edges": EDGES,
                "edges_held": held,
            },
            indent=2,
        )
    )
    return 0 if held else 1


if __name__ == "__main__":
    sys.exit(main())
