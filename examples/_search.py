"""examples/compare.py's protocol: a hyperparameter search on validation tasks, then held-out evaluation.

Protocol (used by ``examples/compare.py``): each method has a small grid of candidate
configurations.  Every candidate is meta-trained from the same initial parameters on the same task
stream, then adapted to a fixed set of *validation* tasks for ``0..K`` steps.  Its score is the
lowest mean validation loss over the adaptation steps (the early-stopping optimum, the most
favourable reading for methods that overfit), and the step where it occurs is the method's
validation-chosen number of steps.  The best-scoring candidate's trained state is then evaluated
once on the *held-out* tasks, which no choice ever sees.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import numpy as np

from hiermeta import LossCurve, MetaLearner, MetaState, TaskBatch, evaluate, fit
from hiermeta.errors import MetaTrainingError

__all__ = ["Candidate", "Trial", "run_trial", "search", "try_evaluate", "curve_summary"]


class Candidate(NamedTuple):
    """One configuration of a method: its hyperparameters (JSON-able) and a learner factory."""

    config: dict
    build: Callable[[], MetaLearner]


class Trial(NamedTuple):
    """A candidate meta-trained and scored on the validation tasks."""

    config: dict
    learner: MetaLearner
    state: MetaState
    history: dict
    score: float  # min over steps of the mean validation loss (inf if evaluation diverged)
    step: int  # the step where it occurs (-1 if none)
    last: float  # mean validation loss at the last step
    status: str  # "ok", or why training stopped early / evaluation failed
    seconds: float

    def to_dict(self) -> dict:
        return {"config": self.config, "val_score": self.score, "val_step": self.step, "val_last": self.last,
                "num_skipped": int(self.state.num_skipped), "status": self.status, "seconds": self.seconds}


def try_evaluate(learner: MetaLearner, state: MetaState, tasks: TaskBatch, num_steps: int):
    """:func:`hiermeta.evaluate`, returning ``(curve, "ok")`` or ``(None, reason)`` if an inner loop diverged."""
    try:
        return evaluate(learner, state, tasks, num_steps), "ok"
    except ValueError as err:
        return None, str(err)


def curve_summary(curve: Optional[LossCurve], chosen_step: Optional[int] = None) -> dict:
    """``best`` (min over steps) and ``best_step``, ``last``, and the value at ``chosen_step``."""
    if curve is None:
        return {"best": math.inf, "best_step": -1, "last": math.inf, "chosen_step": chosen_step, "at_chosen": math.inf}
    k = int(np.argmin(curve.mean))
    out = {"best": float(curve.mean[k]), "best_step": k, "last": float(curve.mean[-1]),
           "last_sem": float(curve.sem[-1]), "best_sem": float(curve.sem[k])}
    if chosen_step is not None and chosen_step >= 0:
        out.update(chosen_step=int(chosen_step), at_chosen=float(curve.mean[chosen_step]),
                   at_chosen_sem=float(curve.sem[chosen_step]))
    return out


def run_trial(candidate: Candidate, init_params: Any, sample_tasks: Callable[[jax.Array], TaskBatch],
              meta_steps: int, *, data_key: jax.Array, init_key: jax.Array, val_tasks: TaskBatch,
              eval_steps: int, description: Optional[str] = None, progress: bool = True) -> Trial:
    """Meta-train one candidate and score it on the validation tasks.

    A run that :func:`~hiermeta.fit` stops (too many skipped steps) keeps its last good state and is
    scored like any other, with the reason in ``status``; a candidate whose validation adaptation
    diverges scores ``inf``.
    """
    t0 = time.perf_counter()
    learner = candidate.build()
    state = learner.init(init_key, init_params)
    status = "ok"
    try:
        state, history = fit(learner, state, sample_tasks, meta_steps, data_key=data_key, progress=progress,
                             description=description or learner.name)
    except MetaTrainingError as err:
        state, history = err.state, err.history
        status = f"training stopped after {int(state.step)} steps: {int(state.num_skipped)} skipped"
    curve, message = try_evaluate(learner, state, val_tasks, eval_steps)
    if curve is None:
        status = "validation: " + message
        score, step, last = math.inf, -1, math.inf
    else:
        step = int(np.argmin(curve.mean))
        score, last = float(curve.mean[step]), float(curve.mean[-1])
    return Trial(candidate.config, learner, state, history, score, step, last, status, time.perf_counter() - t0)


def search(candidates: Sequence[Candidate], init_params: Any, sample_tasks, meta_steps: int, *,
           data_key, init_key, val_tasks: TaskBatch, eval_steps: int, name: str = "",
           progress: bool = True, log: Callable[[str], None] = print) -> tuple[Trial, list[Trial]]:
    """Run every candidate (:func:`run_trial`); return the best (lowest score) and all trials."""
    if not candidates:
        raise ValueError(f"{name}: no candidate configurations to search")
    trials = []
    for i, cand in enumerate(candidates):
        trial = run_trial(cand, init_params, sample_tasks, meta_steps, data_key=data_key, init_key=init_key,
                          val_tasks=val_tasks, eval_steps=eval_steps, progress=progress,
                          description=f"{name} {i + 1}/{len(candidates)}")
        log(f"  {name:16s} {_fmt(cand.config):48s} val best {trial.score:8.4f} @ {trial.step:4d}   "
            f"last {trial.last:8.4f}   {trial.seconds:5.1f}s  {trial.status}")
        trials.append(trial)
    best = min(trials, key=lambda t: (t.score, t.last))
    return best, trials


def _fmt(config: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in config.items())
