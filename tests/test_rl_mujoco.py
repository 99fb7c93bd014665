"""The MuJoCo locomotion presets (optional extra metarun[rl]): they run a few outer steps when
gymnasium and mujoco are installed, and say how to install them when not."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

from metarun.data.locomotion import VelocityTasks, locomotion_reward
from metarun.runner import api
from metarun.spec.errors import ConfigError


def _installed() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("gymnasium", "mujoco", "imageio"))


needs_mujoco = pytest.mark.skipif(
    not _installed(), reason="gymnasium/mujoco not installed (pip install 'metarun[rl]')"
)

TINY = [
    "dataset.horizon=8",
    "model.hidden=[16]",
    "meta_batch_size=2",
    "algo.fast_batch_size=2",
    "outer_steps=2",
    "eval.every=0",
    "eval.num_tasks=2",
    "eval.batch_size=2",
    "eval.curve_steps=[]",
    "log.every=1",
    "save.every=0",
    "log.progress=false",
    "log.tensorboard=false",
    "device=cpu",
]


pytestmark = pytest.mark.usefixtures("one_thread")


@needs_mujoco
@pytest.mark.parametrize("preset", ["halfcheetah_vel_maml", "halfcheetah_dir_maml"])
def test_preset_runs_a_few_outer_steps(make_config, tmp_path, preset):
    args = [f"experiment={preset}", *TINY]
    summary = api.run(make_config(args), tmp_path / "run", overrides=args)
    assert summary.step == 2
    test = summary.results["test"]["metrics"]
    assert test["return"]["n"] == 2 and torch.isfinite(torch.tensor(test["return"]["mean"]))


def test_rewards_are_the_authors():
    v = torch.tensor([0.5, 0.5, -1.0])
    goals = torch.tensor([0.5, 2.0, 1.0])
    actions = torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    vel = locomotion_reward(v, goals, actions, direction=False)
    torch.testing.assert_close(vel, torch.tensor([0.0, -1.5 - 0.1, -2.0 - 0.2]))
    dirs = locomotion_reward(v, torch.tensor([1.0, -1.0, -1.0]), actions, direction=True)
    torch.testing.assert_close(dirs, torch.tensor([0.5, -0.5 - 0.1, 1.0 - 0.2]))
    tasks = VelocityTasks(0.0, 2.0, direction=True).sample(50, torch.Generator().manual_seed(0))
    assert set(tasks.support_x.flatten().tolist()) == {-1.0, 1.0}
    speeds = VelocityTasks(0.0, 2.0, direction=False).sample(50, torch.Generator().manual_seed(0))
    assert 0.0 <= float(speeds.support_x.min()) and float(speeds.support_x.max()) <= 2.0


def test_missing_extra_names_the_install_command(make_config, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gymnasium", None)  # import gymnasium -> ImportError
    args = ["experiment=halfcheetah_vel_maml", *TINY]
    with pytest.raises(ConfigError, match=r"pip install 'metarun\[rl\]'"):
        api.run(make_config(args), tmp_path / "run", overrides=args)
