"""Which differences in `make demo`'s table are real: the demo grid run with several seeds, each cell's AP per
seed, the seed-to-seed spread and the differences between cells.

    python benchmarks/demo_spread.py --seeds 0 1 2 --json benchmarks/results/demo_spread.json

Each seed runs `experiments/ablation_grid.py` on the demo config (`--config`, default the demo's) as its own grid
(`run.name=<name>_seed<S>`, `train.seed=S`, its own MLflow experiment `querypose-<name>-seed<S>`), then the cells'
last `val/AP` are read back from the child runs. `--name` (default `demo_spread`) keeps a variant's grids apart
from earlier ones: a grid rerun under its old name with other settings is refused. A difference between two
cells counts as real when it exceeds the larger of their seed-to-seed spreads, in the same direction for every
seed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))

DEMO_CONFIG = PROJECT_ROOT / "experiments" / "configs" / "ablation_synthetic.yaml"


def run_grid(config: Path, name: str, seed: int, experiment: str, overrides: list[str]) -> float:
    started = time.perf_counter()
    command = [sys.executable, str(PROJECT_ROOT / "experiments" / "ablation_grid.py"), "--config", str(config),
               f"train.seed={seed}", f"run.name={name}_seed{seed}", f"tracking.experiment={experiment}",
               "tune.register_model=null", *overrides]  # fmt: skip
    subprocess.run(command, check=True, cwd=PROJECT_ROOT)
    return time.perf_counter() - started


def cell_aps(config: Path, seed: int, experiment: str, overrides: list[str]) -> dict[str, float]:
    from querypose_platform.config import load_config
    from querypose_platform.tracking import client_for
    from querypose_platform.tuning import CELL_TAG

    cfg = load_config(config, [f"tracking.experiment={experiment}", *overrides])
    client = client_for(cfg.tracking)
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id], filter_string=f"tags.`{CELL_TAG}` != ''")
    return {run.data.tags[CELL_TAG]: run.data.metrics.get("val/AP", float("nan")) for run in runs}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=DEMO_CONFIG)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--name", default="demo_spread", help="prefix of the grids' run names and experiments")
    parser.add_argument("overrides", nargs="*", help="dotted overrides for every grid")
    args = parser.parse_args(argv)

    per_seed: dict[int, dict[str, float]] = {}
    minutes: dict[int, float] = {}
    for seed in args.seeds:
        experiment = f"querypose-{args.name.replace('_', '-')}-seed{seed}"
        minutes[seed] = run_grid(args.config, args.name, seed, experiment, args.overrides) / 60
        per_seed[seed] = cell_aps(args.config, seed, experiment, args.overrides)
    cells = sorted(set.intersection(*(set(aps) for aps in per_seed.values())))
    spread = {cell: max(per_seed[s][cell] for s in args.seeds) - min(per_seed[s][cell] for s in args.seeds)
              for cell in cells}  # fmt: skip

    print("\n" + f"{'cell':60s} " + " ".join(f"{'seed ' + str(s):>8s}" for s in args.seeds) + f" {'spread':>8s}")
    for cell in cells:
        print(f"{cell:60s} " + " ".join(f"{per_seed[s][cell]:8.3f}" for s in args.seeds) + f" {spread[cell]:8.3f}")
    differences = []
    for a, b in itertools.combinations(cells, 2):
        diffs = [per_seed[s][a] - per_seed[s][b] for s in args.seeds]
        noise = max(spread[a], spread[b])
        real = all(d > noise for d in diffs) or all(-d > noise for d in diffs)
        differences.append({"a": a, "b": b, "differences": diffs, "noise": noise, "real": real})
        print(f"{a} - {b}: " + ", ".join(f"{d:+.3f}" for d in diffs) + f" (noise {noise:.3f}): "
              + ("real" if real else "within the noise"))  # fmt: skip
    print("grid minutes per seed: " + ", ".join(f"seed {s}: {m:.1f}" for s, m in minutes.items()))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        report = {"benchmark": "demo_spread", "config": str(args.config), "overrides": args.overrides,
                  "seeds": args.seeds, "ap": per_seed, "spread": spread, "differences": differences,
                  "minutes": minutes}  # fmt: skip
        args.json.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
