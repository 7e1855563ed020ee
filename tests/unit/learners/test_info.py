"""hiermeta/learners/info.py: typed step infos, and the flat dict fit's history stacks."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hiermeta as hm
from hiermeta.learners.info import BilevelInfo, MAMLInfo, ProtoNetInfo, ReptileInfo, ShrinkageMAPInfo, step_metrics


def test_step_metrics_flattens_the_extra_sites_in_field_order():
    info = ReptileInfo(val_log_lik=1.0, inner_loss=2.0, extra={"noise_sd": 0.5, "gamma": 3.0}, num_diverged=0,
                       inner_stationarity=1e-3, num_unconverged=1, skipped=False)
    got = step_metrics(info)
    assert list(got) == ["val_log_lik", "inner_loss", "noise_sd", "gamma", "num_diverged", "inner_stationarity",
                         "num_unconverged", "skipped"]
    assert got["noise_sd"] == 0.5 and got["num_unconverged"] == 1
    assert list(step_metrics(ProtoNetInfo(1.0, 0.5, 0, True))) == ["val_log_lik", "val_accuracy", "num_missing",
                                                                     "skipped"]
    assert step_metrics({"skipped": False, "loss": 2.0}) == {"skipped": False, "loss": 2.0}  # a learner of one's own


@pytest.mark.filterwarnings("ignore::hiermeta.errors.ConvergenceWarning")  # 5 inner steps, on purpose
def test_each_learner_family_returns_its_info_and_fit_keeps_the_history_keys(paper, paper_model, paper_tasks):
    """Each learner's step returns its family's NamedTuple; fit's history has exactly its flat fields."""
    batch = paper_tasks[1]
    sgd = dict(inner_optimizer=optax.sgd(0.3), inner_steps=5)
    cases = {
        "shrinkage": (hm.m_shrinkage(paper_model, **sgd), BilevelInfo),
        "imaml": (hm.imaml(paper_model, lam=1.0, **sgd), BilevelInfo),
        "shrinkage_map": (hm.shrinkage_map(paper_model, **sgd), ShrinkageMAPInfo),
        "maml": (hm.maml(paper_model, inner_steps=3, init_lr=0.1), MAMLInfo),
        "reptile": (hm.reptile(paper_model, **sgd), ReptileInfo),
    }
    phi = jnp.zeros(paper.num_params)
    for name, (learner, kind) in cases.items():
        state = learner.init(jax.random.PRNGKey(0), phi)
        _, info = jax.jit(learner.step)(state, batch)
        assert type(info) is kind, name
        assert info.extra == {} and not bool(info.skipped), name
        _, history = hm.fit(learner, state, lambda key: batch, 2, data_key=jax.random.PRNGKey(1), progress=False)
        assert sorted(history) == sorted(step_metrics(info)), name
        for field in kind._fields:
            if field != "extra":
                assert np.shape(history[field]) == (2,) + np.shape(getattr(info, field)), (name, field)
