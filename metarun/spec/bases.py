"""Base classes of option schemas: each option declares what it fits, and the cross-group checks
read only these declarations (no table of options anywhere else).

- An algorithm says which kinds of task source it trains on (:attr:`AlgoSchema.task_kinds`) and
  may check run-level keys (:meth:`AlgoSchema.check_run`).
- A dataset says its kind and task type, which model options it takes
  (:attr:`DatasetSchema.models`) and checks a model's values against its own
  (:meth:`DatasetSchema.check_model`).

Subclasses are dataclasses; the attributes here are ``ClassVar`` s, not config keys.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from metarun.spec.errors import ConfigError

#: Few-shot tasks (support and query sets of several classes or functions per step).
EPISODIC = "episodic"
#: One supervised training batch per step with a clean query set (example reweighting).
SUPERVISED = "supervised"


class AlgoSchema:
    """Schema base of an ``algo`` option."""

    task_kinds: ClassVar[tuple[str, ...]] = (EPISODIC,)
    #: The dataset task types it handles ("classification", "regression").
    task_types: ClassVar[tuple[str, ...]] = ("classification", "regression")
    #: The keys that set how it adapts to a task or weights examples: the start-up report says
    #: where each value came from (:mod:`metarun.config.provenance`).
    adaptation_keys: ClassVar[tuple[str, ...]] = ()
    #: Schema defaults of those keys that the algorithm's paper chose, with the source; any
    #: other schema default is generic and reported as such.
    chosen_defaults: ClassVar[dict[str, str]] = {}
    #: The datasets ``chosen_defaults`` were chosen for (empty: any data).
    chosen_for: ClassVar[tuple[str, ...]] = ()
    #: Keys besides ``eval_*`` that only change how a trained model is tested, which
    #: ``mode=eval`` may therefore set (Reptile's ``transductive``).
    evaluation_keys: ClassVar[tuple[str, ...]] = ()

    def check_run(self, run: Any) -> None:
        """Checks of run-level keys this algorithm needs (``run``: the whole RunConfig)."""

    def step_sizes(self) -> dict[str, float]:
        """This algorithm's step-size keys and values (``{"algo.inner_lr": 0.4}``): what a
        diverged run's message tells the user to lower, beside ``meta_optimizer.lr``."""
        return {}

    @property
    def eval_inner_steps(self) -> int | None:
        """Adaptation steps at evaluation when ``eval.inner_steps`` is null (None: the
        algorithm adapts nothing, or decides itself)."""
        return None


class InnerStepSchema(AlgoSchema):
    """Schema base of an algorithm that adapts a classifier by inner gradient steps of size
    ``algo.inner_lr`` (MAML's family, iMAML, Reptile): that is its step size, and as its
    model has one output per training class it tests on as many classes as it trains on."""

    if TYPE_CHECKING:  # a key of each subclass's own schema (not a field here)
        inner_lr: float

    def check_run(self, run: Any) -> None:
        from metarun.spec.checks import require_fixed_ways  # checks imports this module's users

        require_fixed_ways(self, run)

    def step_sizes(self) -> dict[str, float]:
        return {"algo.inner_lr": self.inner_lr}


#: ``adapt(support_x, support_y, steps)``: the algorithm's ``adapt`` for one task, on CPU
#: tensors (the runner moves them to the run's device).
Adapt = Callable[[Any, Any, int], Any]
#: ``predict(adapted, x) -> (N, outputs)`` on the CPU: the algorithm's ``predict``.
Predict = Callable[[Any, Any], Any]


@dataclass
class FunctionFit:
    """One regression task as the MAML paper's Figure 2 draws it (1-D float sequences).

    Attributes:
        x: ``(G,)`` inputs on a grid.
        truth: ``(G,)`` the task's function at ``x``.
        support_x: ``(K,)`` the inputs of the support points adapted to.
        support_y: ``(K,)`` their targets.
        predictions: adaptation steps -> ``(G,)`` the model's output on ``x`` after them
            (0: before adaptation).
        title: the panel's title (e.g. the task's amplitude and phase).
    """

    x: Sequence[float]
    truth: Sequence[float]
    support_x: Sequence[float]
    support_y: Sequence[float]
    predictions: dict[int, Sequence[float]]
    title: str = ""


class DatasetSchema:
    """Schema base of a ``dataset`` option."""

    task_kind: ClassVar[str] = EPISODIC
    task_type: ClassVar[str] = "classification"  # or "regression"
    #: Model options this dataset takes (empty: any).
    models: ClassVar[tuple[str, ...]] = ()

    #: The label whose example-weight mass reweighting algorithms log (None: none).
    minority_class: ClassVar[int | None] = None

    def check_model(self, model: Any) -> None:
        """Value checks between this dataset and the chosen model (input and output shapes)."""

    def ways(self) -> tuple[int | None, int | None]:
        """Classes per training task and per validation/test task (None: not a few-shot
        classification dataset)."""
        return None, None

    def shard_sizes(self) -> dict[str, int]:
        """Per-step example counts, by key, that data-parallel processes split among themselves
        (each must be divisible by their number); empty for task datasets, which split tasks."""
        return {}

    def test_figures(
        self, source: Any, adapt: Adapt, predict: Predict, steps: Sequence[int], seed: int
    ) -> dict[str, list[FunctionFit]]:
        """Pictures of the trained model on a few test tasks, drawn at the final test
        (``<run_dir>/figures/<name>.png`` and TensorBoard ``test_figure/<name>``).

        Args:
            source: this dataset's built test source (``TaskSources.test``).
            adapt: the algorithm's ``adapt`` for one task (no task dimension).
            predict: the algorithm's ``predict``, its output on the CPU.
            steps: the adaptation steps to show, ascending (0: before adaptation).
            seed: ``eval.test_seed``, so every run draws the same tasks.

        Returns:
            figure name -> its panels; empty (the default): no figures.
        """
        return {}


class ModelSchema:
    """Schema base of a ``model`` option."""


def fitting(group: str, options: dict[str, type], keep: Any) -> str:
    """``"algo=a, algo=b or algo=c"`` for the options whose schema satisfies ``keep``."""
    names = [f"{group}={name}" for name, schema in options.items() if keep(schema)]
    if not names:
        return f"no {group} option"
    return ", ".join(names[:-1]) + (" or " if len(names) > 1 else "") + names[-1]


def _fits(algo: type, dataset: type) -> bool:
    """What the two schemas declare: the dataset's kind and task type are ones the algorithm
    takes."""
    return getattr(dataset, "task_kind", EPISODIC) in getattr(
        algo, "task_kinds", (EPISODIC,)
    ) and getattr(dataset, "task_type", "classification") in getattr(
        algo, "task_types", ("classification", "regression")
    )


def check_fits(algo: type, dataset: type, model: type | None) -> None:
    """The chosen options fit each other (by type, before any value is resolved: a conv4 model
    on sinusoid would otherwise fail as an unresolvable ``${dataset.n_way}``).

    Raises:
        ConfigError: naming both options and the ones that would fit.
    """
    from metarun import registry

    algos = {n: o.schema for n, o in registry.options("algo").items()}
    datasets = {n: o.schema for n, o in registry.options("dataset").items()}
    algo_name = registry.option_of("algo", algo).name
    dataset_name = registry.option_of("dataset", dataset).name
    if not _fits(algo, dataset):
        takes_algo = fitting("algo", algos, lambda s: _fits(s, dataset))
        takes_data = fitting("dataset", datasets, lambda s: _fits(algo, s))
        raise ConfigError(
            f"algo={algo_name} does not fit dataset={dataset_name} (dataset={dataset_name} takes "
            f"{takes_algo}; algo={algo_name} takes {takes_data})"
        )
    wanted = getattr(dataset, "models", ())
    if model is not None and wanted:
        model_name = registry.option_of("model", model).name
        if model_name not in wanted:
            use = " or ".join(f"model={w}" for w in wanted)
            raise ConfigError(f"model={model_name} does not fit dataset={dataset_name} (use {use})")
