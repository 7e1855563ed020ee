"""Test configuration: float64 everywhere, a persistent compilation cache, shared fixtures.

The fixtures import the paper's domains (``hiermeta.models``) inside themselves, on purpose: only
the tests that use a domain import it.
"""

import os
from pathlib import Path

# jaxlib's CPU runtime can deadlock its multi-threaded Eigen pool (all threads idle, the main
# thread waiting on a result; see PyAutoFit#1528).  Single-threaded Eigen makes it much rarer,
# and costs nothing measurable on this suite's small arrays.  Must be set before JAX's backend starts.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import hiermeta as hm  # noqa: E402

hm.enable_compilation_cache(
    os.environ.get("JAX_COMPILATION_CACHE_DIR", str(Path(__file__).resolve().parent.parent / ".jax_cache"))
)


@pytest.fixture(scope="session")
def paper():
    from hiermeta.models import linear

    return linear.paper_domain()


@pytest.fixture(scope="session")
def paper_model(paper):
    from hiermeta.models import linear

    return linear.make_model(paper.num_params)


@pytest.fixture(scope="session")
def paper_tasks(paper):
    """25 tasks of the paper's linear domain: (true theta, TaskBatch)."""
    from hiermeta.models import linear

    return linear.sample_tasks(paper, jax.random.PRNGKey(0), 25)


@pytest.fixture(scope="session")
def swirl_domain():
    from hiermeta.models import swirl

    return swirl.paper_domain()


@pytest.fixture(scope="session")
def swirl_model(swirl_domain):
    from hiermeta.models import swirl

    return swirl.make_model(swirl_domain)


@pytest.fixture(scope="session")
def swirl_tasks(swirl_domain):
    """4 tasks of the paper's swirl domain: (true theta, TaskBatch)."""
    from hiermeta.models import swirl

    return swirl.sample_tasks(swirl_domain, jax.random.PRNGKey(0), 4)


@pytest.fixture(scope="session")
def one_step():
    """``one_step(learner, state, batch)``: one meta-step of a learner built with outer SGD at lr 1;
    returns old - new params, i.e. the meta-gradient the step used (the step must not be skipped)."""

    def step(learner, state, batch):
        new, info = jax.jit(learner.step)(state, batch)
        assert not bool(info.skipped)
        return jax.tree_util.tree_map(lambda a, b: np.asarray(a - b), state.params, new.params)

    return step


@pytest.hookimpl(tryfirst=True)  # before ``-m 'not slow'`` deselects
def pytest_collection_modifyitems(config, items):
    """Mark the tests of ``tests/slow_set.py`` slow, and note the entries that match nothing in a
    run of the whole suite (a renamed test would otherwise return to the default run unnoticed)."""
    from slow_set import SLOW_IN_DEFAULT_RUN, STALE_ENTRIES

    entries, used = set(SLOW_IN_DEFAULT_RUN), set()
    for item in items:
        for entry in (item.nodeid, item.nodeid.split("[")[0], item.nodeid.split("::")[0]):
            if entry in entries:
                item.add_marker(pytest.mark.slow)
                used.add(entry)
                break
    whole_suite = config.args_source == pytest.Config.ArgsSource.TESTPATHS  # no paths on the command line
    config.stash[STALE_ENTRIES] = sorted(entries - used) if whole_suite else None
