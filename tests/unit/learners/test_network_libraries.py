"""docs/fewshot.md's Flax (NNX, linen) and Equinox recipes, run as written (skipped without the libraries).

Fast: the recipes' networks, and ProtoNet on each: its adapted head gives the logits
``-||f - c_k||^2 + ||f||^2`` (NumPy prototypes), whichever way the library stores the head's weight.
Slow: the whole recipe (a meta-step of ProtoNet and M-sigma-iMAML on each library's network).
"""

import re
from pathlib import Path

import jax
import numpy as np
import pytest

pytest.importorskip("flax")
pytest.importorskip("equinox")

DOC = Path(__file__).resolve().parents[3] / "docs" / "fewshot.md"


def recipe_blocks() -> list[str]:
    """The python blocks of the section "Bringing your own network", in order."""
    text = DOC.read_text()
    section = text[text.index("## Bringing your own network"):]
    section = section[: section.index("\n## ", 1)]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


@pytest.fixture(scope="module")
def networks():
    namespace = {}
    exec(compile(recipe_blocks()[0], str(DOC), "exec"), namespace)
    return namespace


@pytest.mark.parametrize("library", ["nnx_net", "linen_net", "eqx_net"])
def test_protonet_writes_the_prototype_head_into_any_library_s_parameters(library, networks):
    import hiermeta as hm
    from hiermeta.families import CategoricalLikelihood
    from hiermeta.models import fewshot

    net, ways, size = networks[library], networks["WAYS"], networks["SIZE"]
    partition = hm.ModulePartition.from_labels(net["params"], networks["by_layer"](net["params"]))
    model = hm.HierarchicalModel(CategoricalLikelihood(net["logits"], ways), partition)
    learner = hm.protonet(model, embed=net["embed"], head=net["head"])
    images = np.random.default_rng(0).integers(0, 256, (6, 4, size, size), dtype=np.uint8)
    batch = fewshot.episode_sampler(images, np.arange(6), ways=ways, shots=2, queries=2, num_tasks=2)(
        jax.random.PRNGKey(0))
    state = learner.init(jax.random.PRNGKey(0), net["params"])
    theta = jax.jit(learner.adapt, static_argnums=2)(state, batch.train, 0).theta
    phi = partition.unravel(state.params["phi"])
    embed, logits_fn = jax.jit(net["embed"]), jax.jit(net["logits"])
    for t in range(2):
        f_support = np.asarray(embed(phi, batch.train.inputs[t]), float)
        f_query = np.asarray(embed(phi, batch.val.inputs[t]), float)
        labels = np.asarray(batch.train.labels[t])
        c = np.stack([f_support[labels == k].mean(axis=0) for k in range(ways)])
        logits = np.asarray(logits_fn(partition.unravel(theta[t]), batch.val.inputs[t]), float)
        want = -((f_query[:, None, :] - c[None]) ** 2).sum(-1) + (f_query**2).sum(-1, keepdims=True)
        np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-3 * np.abs(want).max())
    with pytest.raises(ValueError, match="linear head at 'nothing'"):
        hm.protonet(model, embed=net["embed"], head="nothing")


@pytest.mark.slow
def test_the_whole_recipe_runs(networks):
    namespace = dict(networks)
    exec(compile(recipe_blocks()[1], str(DOC), "exec"), namespace)
    results = namespace["results"]
    assert len(results) == 6
    for (library, learner), (state, info) in results.items():
        assert not bool(info.skipped) and np.isfinite(float(info.val_log_lik)), (library, learner)
