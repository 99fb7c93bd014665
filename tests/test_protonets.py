"""Prototypical Networks (Snell et al. 2017): logits against a float64 reference, the
meta-gradient against finite differences, the embedding head, configs, tiny runs (eval_n_way
differing from n_way, metarun.load) and a CI-sized Omniglot learning run through the CLI."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_meta_learned, cli_env, fd_roundoff, omniglot_random, run_metarun
from torch import nn

import metarun
from metarun.algorithms.protonets import ProtoNets, ProtoNetsConfig
from metarun.config import ConfigError
from metarun.models.conv4 import Conv4
from metarun.registry import BuildContext
from metarun.tasks import TaskBatch

OMNIGLOT_DATA = Path(
    os.environ.get("METARUN_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _tiny_model() -> nn.Sequential:
    """Embedding Linear-Tanh-Linear (4 -> 3 -> 3) and a head (index 3) that ProtoNets drops."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 3), nn.Linear(3, 7)).double()


def _task(n_way: int = 3, shots: int = 2, queries: int = 5, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    sy = torch.arange(n_way).repeat(shots)[torch.randperm(n_way * shots, generator=gen)]
    sx = torch.randn(n_way * shots, 4, generator=gen, dtype=torch.float64)
    qy = torch.randint(0, n_way, (queries,), generator=gen)
    qx = torch.randn(queries, 4, generator=gen, dtype=torch.float64)
    return sx, sy, qx, qy


def _reference_logits(embed, sx, sy, qx, n_way):
    """Class means and squared distances by explicit loops, in float64."""
    zs, zq = embed(sx).tolist(), embed(qx).tolist()
    dim = len(zs[0])
    protos = []
    for c in range(n_way):
        members = [z for z, y in zip(zs, sy.tolist()) if y == c]
        protos.append([sum(z[d] for z in members) / len(members) for d in range(dim)])
    return torch.tensor(
        [[-sum((q[d] - p[d]) ** 2 for d in range(dim)) for p in protos] for q in zq],
        dtype=torch.float64,
    )


# ------------------------------------------------------------------------------ the computation


def test_logits_and_loss_match_a_float64_reference():
    model = _tiny_model()
    embed = nn.Sequential(*list(model)[:3])  # shares the parameters, without the head
    algo = ProtoNets(model)
    assert algo.embedding_head == "3" and isinstance(model[3], nn.Identity)
    sx, sy, qx, qy = _task()
    with torch.no_grad():
        expected = _reference_logits(embed, sx, sy, qx, n_way=3)

    adapted = algo.adapt(sx, sy)
    assert adapted["prototypes"].shape == (3, 3)
    logits = algo.predict(adapted, qx)
    assert logits.dtype == torch.float64
    torch.testing.assert_close(logits, expected, rtol=1e-12, atol=1e-12)
    # The training loss is the cross-entropy of the same logits.
    batch = TaskBatch(sx[None], sy[None], qx[None], qy[None])
    metrics = algo.meta_train_step(batch)
    assert math.isclose(
        metrics["train/meta_loss"], float(F.cross_entropy(expected, qy)), rel_tol=1e-12
    )
    accuracy = float((expected.argmax(-1) == qy).double().mean())
    assert metrics["train/accuracy"] == pytest.approx(accuracy)
    assert "train/query_loss" not in metrics and "train/post_loss" not in metrics
    # evaluate: per-task post/ metrics only (no classifier exists before the prototypes).
    two = TaskBatch(*(torch.cat([t, t]) for t in batch.tensors()))
    evaluated = algo.evaluate(two)
    assert set(evaluated) == {"post/loss", "post/accuracy"}
    torch.testing.assert_close(
        evaluated["post/loss"], torch.full((2,), metrics["train/meta_loss"]), rtol=1e-6, atol=0
    )


def test_meta_gradient_matches_finite_differences():
    """Float64 central differences of the mean query loss over two tasks, every parameter entry
    (the gradient flows through both the query embeddings and the prototypes)."""
    algo = ProtoNets(_tiny_model())
    tasks = [_task(seed=s) for s in (1, 2)]
    batch = TaskBatch(*(torch.stack(parts) for parts in zip(*tasks)))
    algo.zero_grad()
    algo.meta_train_step(batch)
    params = dict(algo.model.named_parameters())
    assert set(params) == {"0.weight", "0.bias", "2.weight", "2.bias"}  # the head is gone
    analytic = {n: p.grad.clone() for n, p in params.items()}

    eps, scale = 1e-6, 0.0
    for name, param in params.items():
        numeric = torch.zeros_like(param)
        for i in range(param.numel()):
            values = []
            for sign in (1, -1):
                with torch.no_grad():
                    param.view(-1)[i] += sign * eps
                values.append(algo.meta_train_step(batch)["train/meta_loss"])
                with torch.no_grad():
                    param.view(-1)[i] -= sign * eps
            numeric.view(-1)[i] = (values[0] - values[1]) / (2 * eps)
            scale = max(scale, *(abs(v) for v in values))
        # The absolute part is the differences' roundoff (~2.4e-9 here; atol=1e-8 was 4x above it).
        atol = fd_roundoff(scale, eps)
        torch.testing.assert_close(analytic[name], numeric, rtol=1e-6, atol=atol)
    assert all(g.abs().sum() > 0 for g in analytic.values())


def test_embedding_head_default_and_named_and_errors():
    default = ProtoNets(Conv4(num_classes=5, hidden=8))
    named = ProtoNets(Conv4(num_classes=5, hidden=8), embedding_head="classifier")
    assert default.embedding_head == named.embedding_head == "classifier"
    assert not any(n.startswith("classifier") for n, _ in default.model.named_parameters())
    # Conv4 without its classifier: features + flatten, 8 filters x 2 x 2 on 28x28.
    assert default.embed(torch.zeros(3, 1, 28, 28)).shape == (3, 32)

    with pytest.raises(ConfigError) as error:
        ProtoNets(Conv4(num_classes=5, hidden=8), embedding_head="head")
    message = str(error.value)
    assert "algo.embedding_head" in message and "'head'" in message
    assert "features (Sequential)" in message and "classifier (Linear)" in message
    assert "algo.embedding_head=classifier" in message

    with pytest.raises(ConfigError, match=r"algo.embedding_head=null .* has none"):
        ProtoNets(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten()))

    context = BuildContext("classification", None)
    built = ProtoNets.from_config(ProtoNetsConfig(embedding_head="classifier"), Conv4(), context)
    assert isinstance(built.model.classifier, nn.Identity)


def test_adapt_refuses_steps_and_missing_classes():
    algo = ProtoNets(_tiny_model())
    sx, sy, qx, _ = _task()
    with pytest.raises(ValueError, match="steps=3"):
        algo.adapt(sx, sy, steps=3)
    with pytest.raises(ValueError, match=r"got none for \[1\]"):
        algo.adapt(sx[:2], torch.tensor([0, 2]))


# -------------------------------------------------------------------------------------- configs


def test_configs(make_config):
    run = make_config(
        ["algo=protonets", "dataset=omniglot", "dataset.eval_n_way=5", "dataset.n_way=10"]
    )
    assert run.dataset.ways() == (10, 5) and run.algo.eval_inner_steps == 0
    assert run.algo.embedding_head is None
    with pytest.raises(ConfigError, match=r"algo=protonets does not fit dataset=sinusoid"):
        make_config(["algo=protonets"])
    with pytest.raises(ConfigError, match=r"eval.inner_steps must be null or 0 .* got 3"):
        make_config(["algo=protonets", "dataset=omniglot", "eval.inner_steps=3"])
    with pytest.raises(ConfigError, match=r"eval.curve_steps must be empty"):
        make_config(["algo=protonets", "dataset=omniglot", "eval.curve_steps=[1]"])


@pytest.mark.parametrize("ways", [5, 20])
def test_presets(make_config, ways):
    run = make_config([f"experiment=omniglot_protonets_{ways}way_1shot"])
    assert run.dataset.ways() == (60, ways)
    assert (run.dataset.k_shot, run.dataset.k_query, run.meta_batch_size) == (1, 5, 1)
    assert run.meta_optimizer.lr == 0.001 and run.meta_optimizer.gamma == 0.5
    assert run.meta_optimizer.milestones == list(range(2000, 20000, 2000))
    assert run.model.max_pool and run.name == f"protonets_omniglot_{ways}way_1shot"


def test_maml_refuses_eval_n_way_through_the_cli(tmp_path):
    result = run_metarun(
        [
            "algo=maml",
            "dataset=omniglot",
            "dataset.eval_n_way=10",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        tmp_path,
    )
    assert result.returncode == 2
    assert (
        "error: dataset.eval_n_way must equal dataset.n_way (5) for algo=maml, got 10"
        in result.stderr
    )
    assert "Traceback" not in result.stderr


# ------------------------------------------------------------------------------------ tiny runs


def test_train_10_way_test_5_way_then_load_adapt_predict(train, tmp_path, fake_omniglot):
    summary = train(
        tmp_path,
        [
            "algo=protonets",
            "dataset=omniglot",
            "dataset.n_way=10",
            "dataset.eval_n_way=5",
            "dataset.k_shot=1",
            "dataset.k_query=2",
            "model.hidden=4",
        ],
    )
    assert summary.step == 6
    test = summary.results["test"]
    assert test["inner_steps"] == 0 and set(test["metrics"]) == {"loss", "accuracy"}
    assert test["metrics"]["accuracy"]["n"] == 6 and 0 <= test["metrics"]["accuracy"]["mean"] <= 1
    assert "before adaptation n/a" in summary.format()

    tags = assert_meta_learned(tmp_path, {"train/meta_loss", "train/accuracy", "val/accuracy"})
    assert not any(t.startswith(("train/pre_", "val/pre_")) for t in tags)

    learner = metarun.load(tmp_path / "checkpoints" / "best.pt")
    assert learner.config.dataset.ways() == (10, 5)
    pool = fake_omniglot["test"]
    support_x, support_y = pool[:5, 0], torch.arange(5)  # a 5-way 1-shot task: (5, 1, 28, 28)
    query_x = pool[:5, 1:4].reshape(-1, 1, 28, 28)  # (15, 1, 28, 28)
    predict = learner.adapt(support_x, support_y)
    assert predict.params["prototypes"].shape == (5, 16)  # 4 filters x 2 x 2
    logits = predict(query_x)
    model = learner.model.eval()
    with torch.no_grad():
        protos = model(support_x).flatten(1)  # one shot: the prototypes are the embeddings
        expected = -torch.cdist(model(query_x).flatten(1).double(), protos.double()).pow(2)
    assert logits.shape == (15, 5)
    torch.testing.assert_close(logits.double(), expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="steps=2"):
        learner.adapt(support_x, support_y, steps=2)


@pytest.mark.parametrize("ways", [5, 20])
def test_presets_run_a_couple_of_steps(train, tmp_path, fake_omniglot, ways):
    """Smoke: the 60-way presets, shrunk (2 steps, tiny model; random Omniglot-shaped data)."""
    small = [
        "outer_steps=2",
        "eval.every=2",
        "eval.val_tasks=2",
        "eval.num_tasks=2",
        "model.hidden=2",
        "dataset.k_query=1",
        "dataset.eval_k_query=1",
    ]
    summary = train(tmp_path, [f"experiment=omniglot_protonets_{ways}way_1shot", *small])
    assert summary.step == 2 and summary.results["test"]["metrics"]["accuracy"]["n"] == 2


# -------------------------------------------------------------------------------- learning test


@pytest.mark.slow
@pytest.mark.skipif(
    not list((OMNIGLOT_DATA / "omniglot").glob("images_background*")),
    reason="Omniglot archives not under $METARUN_DATA/omniglot",
)
def test_omniglot_short_run_beats_chance(tmp_path):
    """Real data through the CLI: 80 episodes of 20-way 1-shot training, 5-way 1-shot test
    (split=random over the characters present). Untrained, this embedding scores about 0.40."""
    run_dir = tmp_path / "run"
    args = [
        "algo=protonets",
        *omniglot_random(tmp_path),
        "dataset.n_way=20",
        "dataset.eval_n_way=5",
        "dataset.k_query=5",
        "model.hidden=32",
        "model.max_pool=true",
        "meta_batch_size=1",
        "outer_steps=80",
        "eval.every=40",
        "eval.val_tasks=20",
        "eval.num_tasks=100",
        "log.every=10",
        "log.progress=false",
        f"hydra.run.dir={run_dir}",
    ]
    result = run_metarun(args, tmp_path, env=cli_env(METARUN_DATA=str(OMNIGLOT_DATA)), timeout=600)
    assert result.returncode == 0, result.stderr
    test = json.loads((run_dir / "results.json").read_text())["test"]
    accuracy = test["metrics"]["accuracy"]
    assert accuracy["n"] == 100
    assert accuracy["mean"] - accuracy["ci95"] > 0.7  # chance: 0.2
    assert "test accuracy:" in result.stdout
