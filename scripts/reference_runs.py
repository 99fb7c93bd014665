"""Bit-for-bit reference of what a redesign must preserve: record before, compare after.

Two records, written outside the checkout:

- ``configs.json``: the resolved config (YAML) of every ``experiment=`` preset and of every
  algorithm x dataset pair the registry declares compatible, composed as the CLI does.
- ``runs/<name>.pt``: the final checkpoint state (parameters, optimizer state) and the logged
  metrics of a fixed list of short runs: every algorithm, loop and vmap, MAML++'s options on
  and off, and one run per preset family on real Omniglot and MNIST files (``$METARUN_DATA``)
  and fake miniImageNet / tieredImageNet / CIFAR-100 files in the real on-disk formats.

    python scripts/reference_runs.py record /tmp/ref          # before a change
    python scripts/reference_runs.py compare /tmp/ref         # after: exit 1 on any difference
    python scripts/reference_runs.py compare /tmp/ref --only maml_loop --configs-only

``compare --expect KEY`` accepts listed config entries as intended changes (printed, not failed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TINY = [
    "outer_steps=3",
    "meta_batch_size=2",
    "log.every=1",
    "eval.every=2",
    "eval.val_tasks=2",
    "eval.num_tasks=3",
    "eval.batch_size=3",
    "save.every=0",
    "log.progress=false",
    "log.tensorboard=false",
    "device=cpu",
    "seed=3",
]
OMNI = ["dataset=omniglot", "dataset.split=random", "model.hidden=8"]
SMALL_IMAGES = ["model.hidden=8", "dataset.image_size=28"]

# name -> overrides (on top of TINY). Each family of presets, each algorithm, loop and vmap.
# No run with task_batching=auto: its choice follows the machine's load, and loop and vmap
# agree only to float rounding.
RUNS: dict[str, list[str]] = {
    "maml_sinusoid_loop": ["algo.task_batching=loop"],
    "maml_sinusoid_vmap": ["algo.task_batching=vmap"],
    "fomaml_sinusoid": ["algo=fomaml", "algo.task_batching=vmap"],
    "metasgd_sinusoid": ["algo=metasgd", "algo.task_batching=loop"],
    "preset_sinusoid": ["experiment=sinusoid", "algo.task_batching=vmap"],
    "maml_omniglot_loop": [*OMNI, "algo.task_batching=loop"],
    "maml_omniglot_vmap": [*OMNI, "algo.task_batching=vmap"],
    "fomaml_omniglot_vmap": ["algo=fomaml", *OMNI, "algo.task_batching=vmap"],
    "metasgd_omniglot": ["algo=metasgd", *OMNI, "algo.task_batching=loop"],
    "maml_msl_lslr_loop": [
        *OMNI,
        "algo.task_batching=loop",
        "algo.multi_step_loss=true",
        "algo.msl_anneal_steps=2",
        "algo.learn_inner_lr=per_layer_per_step",
        "algo.inner_steps=2",
    ],
    "maml_msl_lslr_vmap": [
        *OMNI,
        "algo.task_batching=vmap",
        "algo.multi_step_loss=true",
        "algo.msl_anneal_steps=2",
        "algo.learn_inner_lr=per_layer_per_step",
        "algo.inner_steps=2",
    ],
    "mamlpp_omniglot_loop": ["algo=mamlpp", *OMNI, "algo.task_batching=loop"],
    "mamlpp_omniglot_vmap": ["algo=mamlpp", *OMNI, "algo.task_batching=vmap"],
    "preset_mamlpp": [
        "experiment=omniglot_mamlpp_5way_1shot",
        "dataset.split=random",
        "model.hidden=8",
        "algo.task_batching=loop",
        "algo.first_order_until=2",
    ],
    "preset_omniglot_5way": [
        "experiment=omniglot_5way_1shot",
        "dataset.split=random",
        "model.hidden=8",
        "algo.task_batching=vmap",
    ],
    "preset_omniglot_20way": [
        "experiment=omniglot_20way_1shot",
        "dataset.split=random",
        "model.hidden=8",
        "algo.task_batching=loop",
    ],
    "anil_omniglot_loop": ["algo=anil", *OMNI, "algo.task_batching=loop"],
    "anil_omniglot_vmap": ["algo=anil", *OMNI, "algo.task_batching=vmap"],
    "preset_anil": [
        "experiment=omniglot_anil_5way_1shot",
        "dataset.split=random",
        "model.hidden=8",
        "algo.task_batching=loop",
    ],
    "imaml_omniglot_loop": ["algo=imaml", *OMNI, "algo.task_batching=loop", "algo.inner_steps=3"],
    "imaml_omniglot_vmap": ["algo=imaml", *OMNI, "algo.task_batching=vmap", "algo.inner_steps=3"],
    "preset_imaml": [
        "experiment=omniglot_imaml_5way_1shot",
        "dataset.split=random",
        "model.hidden=8",
        "algo.inner_steps=3",
    ],
    "reptile_omniglot": ["algo=reptile", *OMNI],
    "preset_reptile": [
        "experiment=omniglot_reptile_5way_1shot",
        "dataset.split=random",
        "model.hidden=8",
        "algo.eval_inner_steps=5",
    ],
    "protonets_omniglot": ["algo=protonets", *OMNI],
    "preset_protonets": [
        "experiment=omniglot_protonets_5way_1shot",
        "dataset.split=random",
        "model.hidden=8",
    ],
    "preset_miniimagenet": ["experiment=miniimagenet_5way_1shot", *SMALL_IMAGES],
    "preset_miniimagenet_protonets": [
        "experiment=miniimagenet_protonets_5way_1shot",
        *SMALL_IMAGES,
    ],
    "preset_miniimagenet_anil": ["experiment=miniimagenet_anil_5way_1shot", *SMALL_IMAGES],
    "preset_cifarfs": ["experiment=cifarfs_5way_1shot", "model.hidden=8"],
    "preset_fc100": ["experiment=fc100_5way_1shot", "model.hidden=8"],
    "maml_tieredimagenet": ["dataset=tieredimagenet", *SMALL_IMAGES],
    "l2rw_mnist": [
        "algo=l2rw",
        "dataset=mnist_imbalance",
        "dataset.source_split=test",
        "dataset.n_train=758",
        "meta_batch_size=1",
        "dataset.batch_size=20",
    ],
    "erm_mnist": [
        "algo=erm",
        "dataset=mnist_imbalance",
        "dataset.source_split=test",
        "dataset.n_train=758",
        "meta_batch_size=1",
        "dataset.batch_size=20",
    ],
    "mwn_mnist": [
        "algo=mwn",
        "dataset=mnist_imbalance",
        "dataset.source_split=test",
        "dataset.n_train=758",
        "meta_batch_size=1",
        "dataset.batch_size=20",
    ],
}


def _compose_all(conf: Path) -> dict[str, str]:
    """The resolved config of every preset and of every compatible algorithm x dataset pair
    (a pair that fails validation records its error message instead)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    from metarun import registry
    from metarun.config import ConfigError, to_yaml, validate
    from metarun.config.store import register_configs
    from metarun.spec.bases import _fits

    register_configs()
    entries: list[tuple[str, list[str]]] = []
    for path in sorted((conf / "experiment").glob("*.yaml")):
        entries.append((f"experiment={path.stem}", [f"experiment={path.stem}"]))
    algos = registry.options("algo")
    datasets = registry.options("dataset")
    for a, algo in algos.items():
        for d, dataset in datasets.items():
            if _fits(algo.schema, dataset.schema):
                entries.append((f"algo={a} dataset={d}", [f"algo={a}", f"dataset={d}"]))
    out: dict[str, str] = {}
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        for key, overrides in entries:
            cfg = compose("config", overrides=overrides, return_hydra_config=True)
            HydraConfig.instance().set_config(cfg)
            try:
                out[key] = to_yaml(validate(cfg))
            except ConfigError as error:
                out[key] = f"ConfigError: {error}"
    return out


def _write_fake_data(root: Path, shared: Path) -> None:
    """Real Omniglot/MNIST by link, fake image benchmarks in their real on-disk formats."""
    from metarun.testing import write_cifar, write_miniimagenet, write_tieredimagenet

    for name in ("omniglot", "mnist"):
        (root / name).symlink_to((shared / name).resolve())
    # The data of the first record (scripts/smoke_benchmarks.py's at --per-class 20 and 24):
    # other sizes or orders would change every image benchmark's run.
    write_miniimagenet(root / "miniimagenet", per_class=20, side=28, upscale=3, shuffle=False)
    write_tieredimagenet(root / "tieredimagenet", per_class=20, side=28, upscale=3, shuffle=False)
    write_cifar(root, 100, per_class=20, test_per_class=4, shuffle=False)


def _one_run(name: str, overrides: Sequence[str], conf: Path, work: Path) -> dict[str, Any]:
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    from metarun.config import validate
    from metarun.config.store import register_configs
    from metarun.runner import api

    register_configs()
    torch.manual_seed(0)
    args = [*TINY, *overrides]
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("config", overrides=args, return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        run = validate(cfg)
    run_dir = work / name
    api.run(run, run_dir, overrides=args)
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    results = json.loads((run_dir / "results.json").read_text())
    return {
        "algorithm": state["algorithm"],
        "meta_opt": state["meta_opt"],
        "metrics": metrics,
        "test": results.get("test"),
    }


# Config entries changed on purpose since the record (issue 18, 2026-12-05): FOMAML and ANIL on
# tieredImageNet adapt with MAML's 5+10 steps (they used 1+1), MAML++ on Omniglot takes the
# data's inner rate, Reptile's Omniglot batch sizes and MWN's long-tail rate live in presets.
INTENDED = (
    "algo=anil dataset=tieredimagenet",
    "algo=fomaml dataset=tieredimagenet",
    "algo=mamlpp dataset=omniglot",
    "algo=mwn dataset=cifar100_lt",
    "algo=mwn dataset=cifar10_lt",
    "algo=reptile dataset=omniglot",
)

# Run-level keys added since the first record (absent from it, so not compared).
NEW_KEYS = ("adapt", "test_dataset", "divergence_factor")


def _without_new_keys(text: str | None) -> Any:
    import yaml

    if text is None or text.startswith("ConfigError"):
        return text
    data = yaml.safe_load(text)
    for key in NEW_KEYS:
        data.pop(key, None)
    # 2026-12-06: eval.figures is new; eval.curve_steps' default became null (the algorithm's
    # curve, drawn at the test) where it was [] (no curve): the test's numbers are unchanged.
    evaluation = data.get("eval") or {}
    evaluation.pop("figures", None)
    if evaluation.get("curve_steps") in ([], None):
        evaluation.pop("curve_steps", None)
    return data


def _one_tag_per_quantity(result: dict[str, Any]) -> dict[str, Any]:
    """Metrics under today's tags (2026-12-05): train/query_loss and a train/post_loss equal to
    train/meta_loss dropped, train/post_accuracy named train/accuracy."""
    rows = []
    for row in result["metrics"]:
        row = {k: v for k, v in row.items() if k != "train/query_loss"}
        if row.get("train/post_loss") == row.get("train/meta_loss"):
            row.pop("train/post_loss", None)
        if "train/post_accuracy" in row:
            row["train/accuracy"] = row.pop("train/post_accuracy")
        rows.append(row)
    return {**result, "metrics": rows}


_TIMING = ("time", "sec", "seconds", "per_step", "ms")


def _strip_timing(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            k: _strip_timing(v)
            for k, v in value.items()
            if not (isinstance(k, str) and any(t in k for t in _TIMING))
        }
    if isinstance(value, list):
        return [_strip_timing(v) for v in value]
    return value


def _same(a: Any, b: Any, path: str = "") -> list[str]:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        ok = (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(a, b)
        )
        return [] if ok else [path or "<root>"]
    if isinstance(a, dict) and isinstance(b, dict):
        diffs = [f"{path}.{k} (only in one)" for k in set(a) ^ set(b)]
        for k in set(a) & set(b):
            diffs += _same(a[k], b[k], f"{path}.{k}")
        return diffs
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{path} (length {len(a)} vs {len(b)})"]
        diffs = []
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            diffs += _same(x, y, f"{path}[{i}]")
        return diffs
    return [] if a == b else [f"{path}: {a!r} vs {b!r}"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("record", "compare"))
    parser.add_argument("dir", type=Path, help="where the reference lives (outside the checkout)")
    parser.add_argument("--only", nargs="*", default=None, help="run names (default: all)")
    parser.add_argument("--configs-only", action="store_true")
    parser.add_argument("--runs-only", action="store_true")
    parser.add_argument(
        "--expect",
        nargs="*",
        default=list(INTENDED),
        help="config entries allowed to differ (default: the changes made on purpose since the "
        "record, INTENDED)",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)  # one thread: no reduction-order differences between records
    conf = Path(__file__).resolve().parent.parent / "conf"
    shared = Path(os.environ.get("METARUN_DATA", conf.parent.parent / "shared" / "data"))
    args.dir.mkdir(parents=True, exist_ok=True)
    failed = False

    if not args.runs_only:
        configs = _compose_all(conf)
        target = args.dir / "configs.json"
        if args.action == "record":
            target.write_text(json.dumps(configs, indent=1, sort_keys=True))
            print(f"recorded {len(configs)} configs")
        else:
            before = json.loads(target.read_text())
            for key in sorted(set(before) | set(configs)):
                if _without_new_keys(before.get(key)) == _without_new_keys(configs.get(key)):
                    continue
                if key not in before:  # an option or preset added since the record
                    print(f"config new: {key}")
                    continue
                tag = "expected" if key in args.expect else "DIFFERS"
                failed |= tag == "DIFFERS"
                print(f"config {tag}: {key}")
                if tag == "DIFFERS":
                    import difflib

                    diff = difflib.unified_diff(
                        (before.get(key) or "").splitlines(),
                        (configs.get(key) or "").splitlines(),
                        lineterm="",
                        n=1,
                    )
                    print("\n".join(list(diff)[2:40]))
            print(f"configs compared: {len(configs)}")

    if not args.configs_only:
        names = args.only if args.only else list(RUNS)
        with tempfile.TemporaryDirectory() as tmp:
            data = Path(tmp) / "data"
            data.mkdir()
            _write_fake_data(data, shared)
            os.environ["METARUN_DATA"] = str(data)
            for name in names:
                result = _strip_timing(_one_run(name, RUNS[name], conf, Path(tmp) / "runs"))
                target = args.dir / "runs" / f"{name}.pt"
                if args.action == "record":
                    target.parent.mkdir(parents=True, exist_ok=True)
                    torch.save(result, target)
                    print(f"recorded {name}: test {result['test']}")
                else:
                    before = torch.load(target, weights_only=False)
                    diffs = _same(_one_tag_per_quantity(before), _one_tag_per_quantity(result))
                    failed |= bool(diffs)
                    status = "identical" if not diffs else "DIFFERS: " + "; ".join(diffs[:5])
                    print(f"run {name}: {status}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
