"""Ray Tune parts of a method shootout (:class:`~contrastlab.sweep.space.ShootoutSpace`): one
searcher and one scheduler per method behind Tune's single ones.

Why not one Optuna study with the method as a categorical: TPE then spends trials on the
method that leads early, so the methods get unequal trial counts, and a method's parameters
would be modelled on other methods' results. Here the ``i``-th trial Tune asks for belongs to
method ``i mod k`` (the file's order), each method has its own study (its parameters, its
history), and Tune's ``num_samples = trials x k`` gives every method exactly ``trials``
trials. ASHA likewise keeps rungs per method: a trial is stopped only for being behind its own
method's trials, so a method that learns slowly early is not cut by another's fast start.

Both classes are importable at module level because Tune pickles them with its experiment
state (``--resume``).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from typing import Any

from ray.tune.schedulers import FIFOScheduler, TrialScheduler
from ray.tune.search import Searcher

from contrastlab.sweep.space import METHOD_KEY


class PerMethodSearch(Searcher):
    """Round-robin over one searcher per method (see the module docstring).

    Args:
        searchers: ``{method: searcher}`` in round-robin order (each e.g. an ``OptunaSearch``
            over that method's space).
        metric: The (first) objective, as Tune's other parts see it.
        mode: Its mode.
    """

    def __init__(self, searchers: dict[str, Searcher], metric: str, mode: str):
        super().__init__(metric=metric, mode=mode)
        self.searchers = dict(searchers)
        self.order = list(searchers)
        self.suggested = 0  # trials handed out so far: the next one's method is order[n % k]
        self.owner: dict[str, str] = {}

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        method = self.owner.get(trial_id) or self.order[self.suggested % len(self.order)]
        config = self.searchers[method].suggest(trial_id)
        if config is None:
            return None
        if trial_id not in self.owner:
            self.owner[trial_id] = method
            self.suggested += 1
        return {METHOD_KEY: method, **config}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self.owner:
            self.searchers[self.owner[trial_id]].on_trial_result(trial_id, result)

    def on_trial_complete(
        self, trial_id: str, result: dict | None = None, error: bool = False
    ) -> None:
        if trial_id in self.owner:
            self.searchers[self.owner[trial_id]].on_trial_complete(trial_id, result, error)

    def save(self, checkpoint_path: str) -> None:
        # our bookkeeping as JSON; each method's searcher saves itself beside it (Ray's format)
        with open(checkpoint_path, "w") as f:
            json.dump({"suggested": self.suggested, "owner": self.owner}, f)
        for m, searcher in self.searchers.items():
            searcher.save(f"{checkpoint_path}.{m}")

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path) as f:
            state = json.load(f)
        self.suggested, self.owner = state["suggested"], state["owner"]
        for m, searcher in self.searchers.items():
            searcher.restore(f"{checkpoint_path}.{m}")


class PerMethodScheduler(FIFOScheduler):
    """One scheduler per method (e.g. ASHA), chosen by the trial's method; trials start in
    submission order (FIFO), as with a single ASHA.

    Args:
        make: Builds one method's scheduler (called once per method).
        methods: The methods.
    """

    def __init__(self, make: Callable[[], TrialScheduler], methods: tuple[str, ...]):
        super().__init__()
        self.schedulers = {m: make() for m in methods}

    def _of(self, trial) -> TrialScheduler:
        return self.schedulers[trial.config[METHOD_KEY]]

    def on_trial_add(self, tune_controller, trial) -> None:
        self._of(trial).on_trial_add(tune_controller, trial)

    def on_trial_error(self, tune_controller, trial) -> None:
        self._of(trial).on_trial_error(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        return self._of(trial).on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        self._of(trial).on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller, trial) -> None:
        self._of(trial).on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        return "\n".join(f"{m}: {s.debug_string()}" for m, s in self.schedulers.items())

    def save(self, checkpoint_path: str) -> None:
        # each method's scheduler saves itself (ASHA has state; FIFO has none to save)
        for m, scheduler in self.schedulers.items():
            with contextlib.suppress(NotImplementedError):
                scheduler.save(f"{checkpoint_path}.{m}")

    def restore(self, checkpoint_path: str) -> None:
        for m, scheduler in self.schedulers.items():
            if os.path.exists(f"{checkpoint_path}.{m}"):
                scheduler.restore(f"{checkpoint_path}.{m}")


__all__ = ["PerMethodScheduler", "PerMethodSearch"]
