#!/usr/bin/env python
"""CPU-sized runs of every few-shot algorithm on the Omniglot minimal splits: two ``metarun -m``
sweeps over the ``omniglot_cpu*`` presets, and ``metarun-summary`` over both for the table.

Each row is one preset command (docs/results.md, "Every few-shot algorithm, CPU-sized"):
``metarun experiment=omniglot_cpu algo=<algo>`` for maml, fomaml, metasgd and anil, and
``metarun experiment=omniglot_cpu_<algo>`` for the algorithms that need their own settings
(mamlpp, imaml, reptile, protonets). The table gives test accuracy (mean ± 95% CI over the
presets' 300 test tasks) and the steps trained; then the papers' figures, which are full-length
runs and only the direction the full presets head in.

    python scripts/compare_algorithms.py [--only maml anil] [--data DIR] [--out DIR]
    python scripts/compare_algorithms.py --tiny   # 2 steps and 4 test tasks a row (a check)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent

# Algorithms that run under experiment=omniglot_cpu as they are.
PLAIN = ["maml", "fomaml", "metasgd", "anil"]
# Algorithms with their own CPU-sized preset, experiment=omniglot_cpu_<algo>.
OWN_PRESET = ["mamlpp", "imaml", "reptile", "protonets"]
PAPER = {
    "maml": "Finn et al. 2017: 98.7%",
    "fomaml": "Finn et al. 2017: 98.3%",
    "metasgd": "Li et al. 2017: 99.5%",
    "anil": "Raghu et al. 2020 (miniImageNet 5-shot 61.5%)",
    "mamlpp": "Antoniou et al. 2019: 99.47%",
    "imaml": "Rajeswaran et al. 2019: 99.16%",
    "reptile": "Nichol et al. 2018: 95.4% (97.7% transductive)",
    "protonets": "Snell et al. 2017: 98.8%",
}
# --tiny: a check that every row runs (its figures mean nothing). A sweep's keys must fit the
# config Hydra composes before it applies the swept values (experiment=omniglot_cpu's, or the
# default sinusoid MLP's where the experiment is swept), hence the smaller model only there.
TINY = ["outer_steps=2", "eval.num_tasks=4", "eval.batch_size=2"]
TINY_PLAIN = ["model.hidden=8", "algo.task_batching=loop"]
COMMON = ["log.progress=false", "device=cpu"]


def sweeps(only: list[str], tiny: bool) -> dict[str, list[str]]:
    """``{sweep dir name: metarun -m overrides}`` for the rows in ``only``; the dir names sort
    in the table's order."""
    plain = [a for a in PLAIN if a in only]
    own = [a for a in OWN_PRESET if a in only]
    out = {}
    if plain:
        extra = [*TINY, *TINY_PLAIN] if tiny else []
        out["1_omniglot_cpu"] = ["experiment=omniglot_cpu", f"algo={','.join(plain)}", *extra]
    if own:
        presets = ",".join(f"omniglot_cpu_{a}" for a in own)
        out["2_own_presets"] = [f"experiment={presets}", *(TINY if tiny else [])]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--only", nargs="+", choices=[*PLAIN, *OWN_PRESET], default=[*PLAIN, *OWN_PRESET]
    )
    ap.add_argument("--data", default=os.environ.get("METARUN_DATA", "data"))
    ap.add_argument("--out", type=Path, help="sweep dirs go here (default: a temporary dir)")
    ap.add_argument("--tiny", action="store_true", help="2 steps, 4 test tasks a row (a check)")
    args = ap.parse_args()
    env = {**os.environ, "METARUN_DATA": args.data}
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        failed = False
        for name, overrides in sweeps(args.only, args.tiny).items():
            cmd = [str(BIN / "metarun"), "-m", *overrides, *COMMON, f"hydra.sweep.dir={out / name}"]
            start = time.perf_counter()
            done = subprocess.run(cmd, env=env, capture_output=True, text=True)
            seconds = time.perf_counter() - start
            print(f"metarun -m {' '.join(overrides)}: {seconds:.0f} s", file=sys.stderr)
            if done.returncode != 0:  # the summary below shows which jobs failed, and why
                failed = True
                print(done.stderr.strip()[-2000:], file=sys.stderr)
        # One table over both sweeps: metarun-summary finds the jobs under every sweep dir.
        summary = subprocess.run([str(BIN / "metarun-summary"), str(out)], env=env)
        print("\nPapers (Omniglot 5-way 1-shot unless noted; full-length runs):")
        for algo in args.only:
            print(f"- {algo}: {PAPER[algo]}")
    return 1 if failed or summary.returncode != 0 else 0


if __name__ == "__main__":
    raise SystemExit(main())
