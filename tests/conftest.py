"""Test configuration: float64 everywhere, a persistent compilation cache, shared fixtures."""

import os
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

import pytest  # noqa: E402

import hiermeta as hm  # noqa: E402
from models import linear  # noqa: E402

hm.enable_compilation_cache(
    os.environ.get("JAX_COMPILATION_CACHE_DIR", str(Path(__file__).resolve().parent.parent / ".jax_cache"))
)


@pytest.fixture(scope="session")
def paper():
    return linear.paper_domain()


@pytest.fixture(scope="session")
def paper_model(paper):
    return linear.make_model(paper.num_params)


@pytest.fixture(scope="session")
def paper_tasks(paper):
    """25 tasks of the paper's linear domain: (true theta, TaskBatch)."""
    return linear.sample_tasks(paper, jax.random.PRNGKey(0), 25)
