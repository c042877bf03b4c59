"""How to optimise: SMAC's facades with an explicit Sobol design and a single-threaded
forest, warm starts, and the check that an earlier run searched the same space.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from ConfigSpace import Configuration, ConfigurationSpace
from ConfigSpace.hyperparameters import FloatHyperparameter
from smac import HyperparameterOptimizationFacade, MultiFidelityFacade, RandomFacade, Scenario
from smac.acquisition.function import PriorAcquisitionFunction
from smac.acquisition.maximizer.local_search import LocalSearch
from smac.facade.abstract_facade import AbstractFacade
from smac.initial_design import RandomInitialDesign, SobolInitialDesign
from smac.model.random_forest import RandomForest
from smac.multi_objective.parego import ParEGO
from smac.runhistory.dataclasses import TrialInfo, TrialValue

from ..errors import SettingsError
from ..space import with_prior
from ..types import TrialResult, budget_rank
from .objective import WORST_COST, Fidelity


class _RepeatableLocalSearch(LocalSearch):
    """SMAC 2.4.1 dedupes local-search start points through a set, whose order follows
    Python's per-process hash seed, so one --seed gave different searches in different
    processes. Sorting the start points by their vector makes a seeded search repeatable."""

    def _get_initial_points(self, *args, **kwargs):
        points = super()._get_initial_points(*args, **kwargs)
        return sorted(points, key=lambda c: tuple(np.nan_to_num(c.get_array(), nan=-1.0)))


class Belief:
    """Where πBO's prior is centred, checked by the search's own first trials, and where the
    search goes after them.

    The prior's rule predicts a configuration and variants of it (prior.prior_plans, and the
    rule corrected by the baselines, prior.by_baselines, and the best so far rescaled,
    pipeline._Rescale, each chosen when SMAC reads it: `place`),
    all evaluated right after the baselines. The belief starts at the rule's prediction
    (`centres`' first) and settles once every candidate centre has a result, on the best of
    them scored on all of the data (a candidate stopped early never centres it; the search
    never races them). Where that one scored at least as well as every baseline scored on
    all of the data (`references`), the prediction is confirmed: the belief is centred on it
    and the initial design ends there (`follow`: the Sobol points not asked yet are dropped),
    so the search goes on by πBO around the best start instead of sampling the space
    uniformly first. Where a baseline beat every candidate, the rule is wrong for these
    models: the belief is dropped (plain expected improvement) and the Sobol design goes on.

    bench_prior measured both (scripts/results/prior.md). On both SmolLM2 pairs a variant beat
    the prediction and every baseline in every seed (sentiment-wordnet: full balance, validation
    H 1.00 vs the best baseline's 0.78; langid-digits: weights x1.25, 0.79 vs 0.64); there
    17 more Sobol points after them left the search at 94 % of the default's trials to its
    best, and ending the design there led every seed by trial 15. On the demo every one of the
    rule's candidates scored below linear's 0.63 (0.54-0.57); there πBO around linear ended
    0.03 below the default search, whose wider exploration found better merges. Since the rule
    corrected by the baselines starts first (pipeline._Correction), it is the confirmed one on
    the demo (0.69) and on sentiment-wordnet (1.06) in every seed; rescaled last, it becomes
    x1.15 on the demo (0.6935), the line search's gain that moved the demo past its default
    searches' bests. NePS, by πBO's authors, also
    spends its initial design near a prior when there is one (it draws it from the prior:
    neps/optimizers/bayesian_optimization.py), not uniformly.

    `space` is the searched space; `centres` and `references` are the configurations by
    label, as trials record them (space.plain_values).
    """

    def __init__(self, space: ConfigurationSpace, centres: dict[str, dict],
                 references: dict[str, dict], seed: int):  # fmt: skip
        self._space, self._seed = space, seed
        self._centres, self._references = centres, references
        self._design: list[Configuration] = []
        self._first = 0
        self.label: str | None = next(iter(centres))
        self.settled = False
        self.believed = self._believed(centres[self.label])

    def _believed(self, values: dict) -> ConfigurationSpace:
        return with_prior(self._space, Configuration(self._space, values=values), self._seed)

    def follow(self, design: list[Configuration], first: int) -> None:
        """The initial design as SMAC reads it, one configuration at a time (make_optimizer):
        the configurations after the first `first` (the baselines and the candidates) are
        the Sobol points a confirmed prediction drops."""
        self._design, self._first = design, first

    def place(self, label: str, values: dict) -> None:
        """A candidate centre chosen when SMAC read its slot (make_optimizer's `late`), in
        place of the one it stood in for. One that is a baseline's counts as the rule's, as
        a prediction equal to a baseline does."""
        self._centres[label] = values

    def design_size(self) -> int:
        """The initial design's size now: πBO's prior fades with the trials after it."""
        return len(self._design)

    def observe(self, results: Sequence[TrialResult]) -> None:
        """Settle the belief once every candidate centre has a result (then it stays: the
        same trials give the same belief, resumed or not)."""
        if self.settled:
            return
        if not all(any(r.config == c for r in results) for c in self._centres.values()):
            return  # not all scored yet
        full = [r for r in results if r.status == "ok" and not r.partial]

        def best(configs: dict[str, dict]) -> dict[str, float]:
            return {label: max((r.harmonic_mean for r in full if r.config == config),
                               default=-np.inf) for label, config in configs.items()}  # fmt: skip

        ours, theirs = best(self._centres), best(self._references)
        label = max(ours, key=ours.get)
        self.settled = True
        if ours[label] == -np.inf or ours[label] < max(theirs.values(), default=-np.inf):
            self.label, self.believed = None, None  # a baseline beat the rule: dropped
            return
        self.label, self.believed = label, self._believed(self._centres[label])
        # SMAC reads the design by index: what is cut was never asked, and no point repeats.
        del self._design[self._first :]


class _ConditionalPrior(PriorAcquisitionFunction):
    """SMAC's πBO (expected improvement times the prior's density, to the power
    decay_beta / (trials since the design + 1)) for a conditional space. SMAC 2.4.1 takes the
    density of every parameter, and an inactive one (NaN: a density under a method without
    densities) has density 0, so every configuration with an inactive parameter, i.e. all of
    ours, got the floor 1e-12 and the prior said nothing. Here an inactive parameter counts
    1: a configuration's prior is that of the parameters it uses. The densities come from
    the belief's space with priors (space.with_prior, Belief): SMAC's forest refuses
    conditional normal parameters, so the forest and the maximiser keep the uniform space
    (the two encode configurations alike: ConfigSpace maps every float to [0, 1])."""

    def __init__(self, acquisition, decay_beta: float, belief: Belief):
        super().__init__(acquisition, decay_beta)
        self._belief = belief

    def _update(self, **kwargs) -> None:
        # SMAC counts trials from the data the forest first saw, which on Dask workers (or a
        # resumed run told its finished trials first) is not the design's end: count them
        # from the design's size, which the belief cuts when it settles.
        self._eta = kwargs["eta"]
        self._initial_design_size = self._belief.design_size()
        self._iteration_number = max(0, kwargs["num_data"] - self._initial_design_size)
        self._acquisition_function.update(model=self.model, **kwargs)

    @property
    def model(self):
        return self._model

    @model.setter
    def model(self, model) -> None:
        self._model = model
        self._discretize = True  # as SMAC does for a forest (piecewise-constant acquisition)

    def _compute_prior(self, X: np.ndarray) -> np.ndarray:
        values = np.ones((len(X), 1))
        if self._belief.believed is None:  # dropped: plain expected improvement
            return values
        self._hyperparameters = dict(self._belief.believed)  # where the belief is now
        bins = int(np.ceil(self._discrete_bins_factor * self._decay_beta
                           / (self._iteration_number + 1)))  # fmt: skip
        for parameter, column in zip(self._hyperparameters.values(), X.T):
            active = ~np.isnan(column)
            if not active.any():
                continue
            if self._discretize and isinstance(parameter, FloatHyperparameter):
                with warnings.catch_warnings():  # SMAC 2.4.1 calls ConfigSpace's old _pdf
                    warnings.simplefilter("ignore", DeprecationWarning)
                    found = self._compute_discretized_pdf(parameter, column[active], bins)
            else:
                found = parameter.pdf_vector(column[active])
            values[active] *= np.asarray(found, dtype=float).reshape(-1, 1)
        return values


class _Design(list):
    """The initial design as SMAC 2.4.1's ConfigSelector reads it: by index, one
    configuration per ask (it iterates the list, so a cut tail is never asked). A slot in
    `late` is read as what its function returns at that moment: a start that depends on the
    trials scored before it (pipeline: the rule corrected by the baselines). No other way
    was found: SMAC's initial designs return their configurations whole, before any trial."""

    def __init__(self, configs: Sequence[Configuration], late: dict[int, Callable] | None = None):
        super().__init__(configs)
        self.late = dict(late or {})

    def __iter__(self):
        index = 0
        while index < len(self):
            if index in self.late:
                self[index] = self.late.pop(index)()
            yield self[index]
            index += 1


class _KnownFirst:
    """An initial design that starts with its additional configurations (SMAC appends them
    after its own points; here they are what is known, the baselines, so they go first).
    `late`: the slots _Design fills when SMAC reads them."""

    late: dict[int, Callable] = {}

    @classmethod
    def with_late(cls, late: dict[int, Callable], *args, **kwargs):
        design = cls(*args, **kwargs)
        design.late = late
        return design

    def select_configurations(self) -> list[Configuration]:
        known = list(self._additional_configs)
        # kept: SMAC reads this list lazily, and a settled Belief cuts its tail (follow)
        self.selected = _Design(
            known + [c for c in super().select_configurations() if c not in known], self.late
        )
        return self.selected


class _SobolKnownFirst(_KnownFirst, SobolInitialDesign):
    pass


class _RandomKnownFirst(_KnownFirst, RandomInitialDesign):
    pass


def make_optimizer(
    space: ConfigurationSpace,
    trials: int,
    initial: int,
    seed: int,
    output: Path,
    kind: str = "smac",
    fidelity: Fidelity | None = None,
    known: Sequence[Configuration] = (),
    objectives: Sequence[str] = (),
    belief: Belief | None = None,
    late: dict[int, Callable[[], Configuration]] | None = None,
) -> AbstractFacade:
    """SMAC's HPO facade with an explicit Sobol initial design and a single-threaded forest.

    The initial design is set explicitly because SMAC's default size rule changes between
    versions; `n_jobs=1` cuts the forest's per-ask cost about threefold on few cores.
    `kind="random"` gives SMAC's random-search facade instead (uniform samples of the same
    space, the usual baseline for an optimiser). With `fidelity`, SMAC's multi-fidelity facade
    (the same forest and design, Hyperband with eta 3 over validation tokens per task, the
    incumbent chosen on the highest budget only). `known` configurations (the baselines) are
    the first trials, before the initial design; they count in `trials`, and the design
    shrinks to fit. `objectives` (task names; two or more): one cost per task, 1 - AP,
    scalarised by SMAC's ParEGO (random task weights per proposal), so that trials spread
    along the Pareto front instead of crowding at one compromise. `belief`: a prior over the
    optimum (Belief, --prior-acquisition); the acquisition is then SMAC's πBO (Hvarfner et
    al. 2022), expected improvement times the prior, whose weight decays as decay_beta /
    (trials since the design + 1), decay_beta = trials / 10 (SMAC's recommended value); the
    design ends when the belief settles (Belief.follow). `late`: index in `known` -> the
    function that gives that start when SMAC reads it (the known one stands in for it).
    """
    known = list(known)[:trials]
    late = {i: get for i, get in (late or {}).items() if i < len(known)}
    initial = max(0, min(initial, trials - len(known))) if known else initial
    budgets = {"min_budget": fidelity.low, "max_budget": fidelity.high} if fidelity else {}
    scenario = Scenario(
        space,
        deterministic=True,
        n_trials=trials,
        seed=seed,
        output_directory=output,
        objectives=list(objectives) if len(objectives) > 1 else "cost",
        **budgets,
    )
    several = {}
    if len(objectives) > 1:  # ParEGO draws new task weights when the forest is retrained:
        several = {  # after every trial, not SMAC's default of every 8 proposals
            "multi_objective_algorithm": ParEGO(scenario, seed=seed),
            "config_selector": HyperparameterOptimizationFacade.get_config_selector(
                scenario, retrain_after=1
            ),
        }
    if kind == "random":
        return RandomFacade(
            scenario,
            target_function=None,
            initial_design=_RandomKnownFirst.with_late(
                late, scenario, n_configs=0 if known else 1, additional_configs=known
            ),
            intensifier=RandomFacade.get_intensifier(scenario, max_config_calls=1),
            overwrite=True,
            logging_level=40,
            **several,
        )
    maximizer = HyperparameterOptimizationFacade.get_acquisition_maximizer(scenario)
    acquisition = {}
    if belief is not None:
        acquisition["acquisition_function"] = _ConditionalPrior(
            HyperparameterOptimizationFacade.get_acquisition_function(scenario), trials / 10,
            belief,
        )  # fmt: skip
    maximizer._local_search.__class__ = _RepeatableLocalSearch
    if fidelity:
        facade = MultiFidelityFacade
        intensifier = MultiFidelityFacade.get_intensifier(
            scenario, eta=Fidelity.ETA, incumbent_selection="highest_budget"
        )
    else:
        facade = HyperparameterOptimizationFacade
        intensifier = facade.get_intensifier(scenario, max_config_calls=1)
    design = _SobolKnownFirst.with_late(late, scenario, n_configs=initial, max_ratio=1.0,
                                        additional_configs=known)  # fmt: skip
    optimizer = facade(
        scenario,
        target_function=None,  # trials are run by ask/tell, so every result is recorded first
        model=RandomForest(space, n_jobs=1, log_y=True, seed=seed),
        acquisition_maximizer=maximizer,
        initial_design=design,
        intensifier=intensifier,
        overwrite=True,
        logging_level=40,
        **several,
        **acquisition,
    )
    if belief is not None:
        belief.follow(design.selected, len(known))
    return optimizer


def check_same_space(earlier: ConfigurationSpace, current: ConfigurationSpace, where: str) -> None:
    """Raises SettingsError naming what differs when an earlier run searched another space."""
    if earlier == current:
        return
    old, new = set(earlier), set(current)
    differences = [f"only in {where}: {', '.join(sorted(old - new))}" if old - new else "",
                   f"only here: {', '.join(sorted(new - old))}" if new - old else ""]  # fmt: skip
    changed = [n for n in sorted(old & new) if earlier[n] != current[n]]
    if changed:
        differences.append(f"different ranges or choices: {', '.join(changed)}")
    raise SettingsError(
        f"--warm-start {where} searched another space ({'; '.join(d for d in differences if d)}); "
        "use a run with the same models, --strategy, --methods and ranges"
    )


def objectives_of(optimizer: AbstractFacade) -> tuple[str, ...]:
    """The tasks of a multi-objective optimiser (one cost each), () for one cost."""
    names = optimizer.scenario.objectives
    return tuple(names) if isinstance(names, list) and len(names) > 1 else ()


def trial_value(result: TrialResult, objectives: Sequence[str] = ()) -> TrialValue:
    """What SMAC is told of a recorded trial: its cost (with `objectives`, 1 - AP per task;
    the worst, 1, for a failed trial or a task without AP) and the seconds it took."""
    seconds = sum(result.seconds.values())
    if not objectives:
        return TrialValue(cost=result.cost, time=seconds)
    costs = []
    for task in objectives:
        score = result.tasks.get(task)
        ap = score.preservation if score is not None and result.status == "ok" else None
        costs.append(WORST_COST - ap if ap is not None and np.isfinite(ap) else WORST_COST)
    return TrialValue(cost=costs, time=seconds)


def tell(optimizer: AbstractFacade, info: TrialInfo, result: TrialResult) -> None:
    """Tell the optimiser the result of a trial it proposed."""
    optimizer.tell(info, trial_value(result, objectives_of(optimizer)))


def warm_start(
    optimizer: AbstractFacade,
    space: ConfigurationSpace,
    trials: Sequence[TrialResult],
    fidelity: Fidelity | None = None,
) -> None:
    """Tell the optimiser an earlier run's finished trials (of the same space) before it asks.

    Of a multi-fidelity run only the trials at its highest budget are told (the others were
    scored on other data); a multi-fidelity search is told them at its own highest budget.
    """
    top = max((budget_rank(trial) for trial in trials), default=None)
    for trial in trials:
        if budget_rank(trial) == top:
            tell_recorded(optimizer, trial, fidelity.high if fidelity else None, space)


def tell_recorded(
    optimizer: AbstractFacade,
    result: TrialResult,
    budget: float | None,
    space: ConfigurationSpace | None = None,
) -> None:
    """Tell the optimiser a trial it did not ask for in this process (a warm start's, or a
    resumed parallel run's), at `budget`."""
    space = space or optimizer.scenario.configspace
    info = TrialInfo(config=Configuration(space, values=result.config), seed=0, budget=budget)
    tell(optimizer, info, result)


def ask(optimizer: AbstractFacade) -> TrialInfo:
    """The optimiser's next trial, without the forest's harmless early-search warnings."""
    with warnings.catch_warnings():
        # SMAC's forest averages empty leaves early in a search; harmless, but noisy.
        warnings.filterwarnings("ignore", "invalid value encountered", RuntimeWarning)
        warnings.filterwarnings("ignore", "Mean of empty slice", RuntimeWarning)
        return optimizer.ask()
