"""`make bench`: run every benchmarks/bench_*.py and write its figures to bench-results/NAME.json.

Each module exposes `run(out_dir: Path) -> dict`. Figures are ratios measured side by side in
one run (these machines are noisy); absolute seconds are reported beside them for context.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys
import time
import traceback
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("names", nargs="*", help="benchmarks to run (default: all), e.g. envs teacher")
    ap.add_argument("--out", default="bench-results")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    here = Path(__file__).parent
    names = args.names or sorted(p.stem[len("bench_"):] for p in here.glob("bench_*.py"))
    failed = 0
    for name in names:
        mod = importlib.import_module(f"benchmarks.bench_{name}")
        print(f"== bench {name}", flush=True)
        t0 = time.time()
        try:
            figures = mod.run(out)
        except Exception:  # noqa: BLE001 - one broken benchmark must not hide the others
            traceback.print_exc()
            failed += 1
            continue
        figures.setdefault("meta", {}).update({"seconds": round(time.time() - t0, 2), "python": sys.version.split()[0],
                                               "machine": platform.machine(), "when": time.strftime("%Y-%m-%dT%H:%M:%S")})
        (out / f"{name}.json").write_text(json.dumps(figures, indent=2))
        print(json.dumps(figures, indent=2), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
