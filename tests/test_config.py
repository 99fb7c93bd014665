"""Config tests: every option and preset composes and validates; bad values fail with the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf

from metarun.cli import config_dir
from metarun.config import (
    SCHEMAS,
    ConfigError,
    Conv4Config,
    FOMAMLConfig,
    InnerLR,
    MAMLConfig,
    MLPConfig,
    Mode,
    OmniglotConfig,
    RunConfig,
    SinusoidConfig,
    from_yaml,
    options,
    to_yaml,
)
from metarun.runner.build import build_experiment, build_tasks, resolve_device

EXPERIMENTS = sorted(p.stem for p in (config_dir() / "experiment").glob("*.yaml"))


def test_default_is_maml_on_sinusoid(make_config):
    run = make_config()
    assert isinstance(run, RunConfig)
    assert type(run.algo) is MAMLConfig and not run.algo.first_order
    assert isinstance(run.dataset, SinusoidConfig) and isinstance(run.model, MLPConfig)
    assert run.name == "maml_sinusoid" and run.mode is Mode.train
    assert run.algo.eval_inner_steps == run.algo.inner_steps == 1  # ${.inner_steps}
    assert run.device == "auto" and run.meta_optimizer.name.value == "adam"


def test_run_name_follows_the_options_and_is_eval_for_mode_eval(make_config):
    assert make_config(["algo=fomaml", "dataset=omniglot"]).name == "fomaml_omniglot"
    # Evaluating a checkpoint: its algorithm and dataset are not the composed defaults.
    assert make_config(["mode=eval", "checkpoint=x.pt"]).name == "eval"
    assert make_config(["name=mine"]).name == "mine"


def test_every_group_option_has_a_schema_and_a_yaml():
    for group, schemas in SCHEMAS.items():
        yamls = {p.stem for p in (config_dir() / group).glob("*.yaml")}
        assert set(schemas) <= yamls, group
        for option in schemas:
            text = (config_dir() / group / f"{option}.yaml").read_text()
            # The schema comes first in the defaults list (Hydra structured-config tutorial); a
            # dataset file is global (it also brings run-level settings), its keys under dataset.
            package = "dataset" if group == "dataset" else "_here_"
            assert f"- /schema/{group}/{option}@{package}" in text


@pytest.mark.parametrize(
    ("overrides", "algo", "dataset", "model"),
    [
        ([], MAMLConfig, SinusoidConfig, MLPConfig),
        (["algo=fomaml"], FOMAMLConfig, SinusoidConfig, MLPConfig),
        (["dataset=omniglot"], MAMLConfig, OmniglotConfig, Conv4Config),
        (
            ["algo=fomaml", "dataset=omniglot", "model=conv4"],
            FOMAMLConfig,
            OmniglotConfig,
            Conv4Config,
        ),
        (["model=mlp"], MAMLConfig, SinusoidConfig, MLPConfig),
    ],
)
def test_group_options_compose(make_config, overrides, algo, dataset, model):
    run = make_config(overrides)
    assert (type(run.algo), type(run.dataset), type(run.model)) == (algo, dataset, model)


def test_omniglot_is_the_paper_run(make_config):
    """`metarun dataset=omniglot`: Finn et al. 2017 5-way 1-shot settings (conf/dataset)."""
    run = make_config(["dataset=omniglot"])
    assert (run.dataset.n_way, run.dataset.k_shot, run.dataset.k_query) == (5, 1, 15)
    assert run.dataset.split.value == "finn" and run.dataset.rotations
    assert (run.algo.inner_lr, run.algo.inner_steps, run.algo.eval_inner_steps) == (0.4, 1, 3)
    assert (run.meta_batch_size, run.outer_steps) == (32, 60000)
    assert run.model.num_classes == 5 and run.model.image_size == 28
    assert run.dataset.root.endswith("omniglot")
    # Command-line values beat the dataset's defaults.
    assert make_config(["dataset=omniglot", "algo.inner_lr=0.1"]).algo.inner_lr == 0.1


def test_model_num_classes_follows_n_way(make_config):
    run = make_config(["dataset=omniglot", "dataset.n_way=20", "dataset.image_size=32"])
    assert run.model.num_classes == 20 and run.model.image_size == 32


def test_data_root_from_environment(make_config, monkeypatch, tmp_path):
    monkeypatch.setenv("METARUN_DATA", str(tmp_path))
    assert make_config(["dataset=omniglot"]).dataset.root == f"{tmp_path}/omniglot"


def _leaves(data, prefix=""):
    """``(key, value)`` for every leaf a YAML file writes (``defaults`` and ``name`` aside)."""
    for key, value in data.items():
        if prefix == "" and key in ("defaults", "name"):
            continue
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_presets_run_with_the_values_their_files_write(make_config, name):
    """Each preset's run has every value its file (and the presets it includes) writes: no
    dataset or algorithm file overrides a preset. The values are read from the files, not
    restated here."""
    from metarun.config.provenance import experiment_chain

    run = OmegaConf.structured(make_config([f"experiment={name}"]))
    written: dict[str, object] = {}
    for _, data in reversed(experiment_chain(config_dir(), name)):
        written.update(_leaves(OmegaConf.to_container(data)))
    assert written, name
    for key, value in written.items():
        if isinstance(value, str) and value.startswith("${"):
            continue  # an interpolation: resolved against the run, checked by its own tests
        got = OmegaConf.select(run, key)
        got = getattr(got, "value", got)
        assert got == value, f"experiment={name}: {key} is {got!r}, its file writes {value!r}"


def test_maml_presets_keep_the_meta_optimizer_and_name(make_config):
    chosen = {n: options(make_config([f"experiment={n}"]))["algo"] for n in EXPERIMENTS}
    for name in (n for n in EXPERIMENTS if chosen[n] == "maml"):
        run = make_config([f"experiment={name}"])
        assert run.meta_optimizer.lr == 0.001 and run.name == f"maml_{name}"
    sinusoid = make_config(["experiment=sinusoid"])
    assert sinusoid.dataset.eval_k_shot == 5 and sinusoid.eval.curve_steps == list(range(1, 11))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_presets_are_overrides_only(name):
    text = (config_dir() / "experiment" / f"{name}.yaml").read_text()
    assert text.startswith("# @package _global_")


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_preset_instantiates(make_config, name):
    """Each preset builds its model and algorithm (data only for sinusoid: no download here)."""
    tiny = ["device=cpu", "model.hidden=4"] if "omniglot" in name else ["device=cpu"]
    run = make_config([f"experiment={name}", *tiny])
    experiment = build_experiment(run, with_data=name == "sinusoid")
    assert experiment.task_type == type(run.dataset).task_type
    assert sum(p.numel() for p in experiment.algorithm.meta_parameters()) > 0
    if "omniglot" in name:
        # A task of the evaluation shape: one support example per class, two queries.
        n_way = run.dataset.ways()[1]
        adapted = experiment.algorithm.adapt(torch.rand(n_way, 1, 28, 28), torch.arange(n_way))
        out = experiment.algorithm.predict(adapted, torch.zeros(2, 1, 28, 28))
        assert out.shape == (2, n_way)


# ----------------------------------------------------------------------- errors at compose time


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("algo.inner_lr=abc", ["Value 'abc'", "full_key: algo.inner_lr"]),
        ("algo.inner_lrr=0.1", ["Key 'inner_lrr' not in", "full_key: algo.inner_lrr"]),
        (
            "algo.learn_inner_lr=sometimes",
            ["Invalid value 'sometimes'", "full_key: algo.learn_inner_lr"],
        ),
        ("meta_optimizer.name=adamw", ["Invalid value 'adamw'", "full_key: meta_optimizer.name"]),
        ("outer_steps=many", ["Value 'many'", "full_key: outer_steps"]),
        ("eval.evry=10", ["Key 'evry' not in", "full_key: eval.evry"]),
    ],
)
def test_bad_override_fails_at_compose_naming_key_and_value(compose_cfg, override, expected):
    with pytest.raises(ConfigCompositionException) as info:
        compose_cfg([override])
    message = f"{info.value}\n{info.value.__cause__}"
    for part in expected:
        assert part in message


def test_unknown_option_lists_the_available_ones(compose_cfg):
    with pytest.raises(MissingConfigException, match="algo/no_such_algo") as info:
        compose_cfg(["algo=no_such_algo"])
    assert "fomaml" in str(info.value) and "maml" in str(info.value)


# ----------------------------------------------------------------- semantic errors at validation


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["algo.inner_steps=0"],
            "algo.inner_steps must be >= 1, got 0 (set e.g. algo.inner_steps=5)",
        ),
        (["algo.inner_lr=-0.1"], "algo.inner_lr must be > 0, got -0.1"),
        (["meta_optimizer.lr=-1"], "meta_optimizer.lr must be > 0, got -1.0"),
        (
            ["meta_optimizer.schedule=step"],
            "meta_optimizer.milestones must be non-empty for meta_optimizer.schedule=step, got []",
        ),
        (
            ["meta_optimizer.milestones=[60000,40000]"],
            "meta_optimizer.milestones must be increasing outer steps >= 1, got [60000, 40000]",
        ),
        (["meta_optimizer.gamma=0"], "meta_optimizer.gamma must be > 0, got 0.0"),
        (
            ["meta_optimizer.min_lr=0.1"],
            "meta_optimizer.min_lr must be in [0, meta_optimizer.lr=0.001], got 0.1",
        ),
        (["dataset=omniglot", "dataset.n_way=1"], "dataset.n_way must be >= 2, got 1"),
        (["dataset.k_shot=0"], "dataset.k_shot must be >= 1, got 0"),
        (["device=gpu"], "device must be auto, cpu, cuda or cuda:N, got 'gpu'"),
        (["device=cuda:x"], "device must be auto, cpu, cuda or cuda:N, got 'cuda:x'"),
        (["grad_clip=0"], "grad_clip must be > 0 or null, got 0.0"),
        (["mode=eval"], "checkpoint must be set with mode=eval"),
        (["checkpoint=x.pt"], "checkpoint is only read with mode=eval"),
        (["model=conv4"], "model=conv4 does not fit dataset=sinusoid (use model=mlp)"),
        (
            ["dataset=omniglot", "model.num_classes=3"],
            "model.num_classes must be equal to dataset.n_way (5), got 3",
        ),
        (["dataset.amplitude=[5,1]"], "dataset.amplitude must be [low, high] with low <= high"),
        (
            ["algo=fomaml", "algo.first_order=false"],
            "algo.first_order must be true for algo=fomaml",
        ),
        (["eval.num_tasks=0"], "eval.num_tasks must be >= 1, got 0"),
        (
            ["algo.checkpoint_inner=true", "algo.task_batching=vmap"],
            "algo.checkpoint_inner=true needs algo.task_batching=loop or auto, got "
            "algo.task_batching=vmap",
        ),
        (
            ["algo.bn_policy=running_stats", "algo.task_batching=vmap"],
            "algo.task_batching=vmap needs algo.bn_policy=batch_stats",
        ),
        (["algo.task_chunk_size=0"], "algo.task_chunk_size must be >= 1 or null, got 0"),
        (["prefetch=-1"], "prefetch must be >= 0, got -1"),
    ],
)
def test_semantic_errors_name_key_and_value(make_config, overrides, message):
    with pytest.raises(ConfigError) as info:
        make_config(overrides)
    assert message in str(info.value)
    assert isinstance(info.value, ValueError)


def test_unresolvable_interpolation_names_the_key(make_config, monkeypatch):
    with pytest.raises(ConfigError, match="dataset.root"):
        make_config(["dataset=omniglot", "dataset.root=${oc.env:METARUN_NO_SUCH_VARIABLE}"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_but_unavailable():
    with pytest.raises(ConfigError, match="device must be an available CUDA device, got 'cuda'"):
        resolve_device("cuda")
    assert resolve_device("auto") == torch.device("cpu")


def test_n_way_above_available_classes(make_config, monkeypatch):
    """The data module's check surfaces as a ConfigError naming dataset.n_way."""
    import metarun.data

    pools = {s: torch.rand(6, 20, 1, 28, 28) for s in ("train", "val", "test")}
    monkeypatch.setattr(metarun.data.omniglot, "load_omniglot", lambda root, **kw: pools)
    run = make_config(["dataset=omniglot", "dataset.n_way=10", "model.num_classes=10"])
    with pytest.raises(ConfigError, match=r"dataset.n_way=10 exceeds the 6 classes"):
        build_tasks(run.dataset)


# ------------------------------------------------------------------------ checkpoint round trip


def test_yaml_round_trip(make_config):
    run = make_config(["algo=fomaml", "algo.learn_inner_lr=per_param", "dataset=omniglot"])
    again = from_yaml(to_yaml(run), options(run))
    assert again == run and again.algo.learn_inner_lr is InnerLR.per_param
    assert options(run) == {"algo": "fomaml", "dataset": "omniglot", "model": "conv4"}
    resolved = OmegaConf.create(to_yaml(run))
    assert "${" not in OmegaConf.to_yaml(resolved)  # fully resolved


def test_from_yaml_rejects_unknown_option(make_config):
    with pytest.raises(ConfigError, match="algo='no_such_algo'"):
        from_yaml(
            to_yaml(make_config()), {"algo": "no_such_algo", "dataset": "sinusoid", "model": "mlp"}
        )


def test_config_dir_is_the_checkout_conf():
    assert config_dir() == Path(__file__).resolve().parents[1] / "conf"
