"""hiermeta/partition.py: which coordinates of a parameter pytree share a sigma."""

import jax.numpy as jnp
import numpy as np
import pytest

from hiermeta import ModulePartition

PARAMS = {"layer1": {"w": jnp.zeros((2, 3)), "b": jnp.zeros(3)}, "out": jnp.zeros(2)}


def test_per_leaf_per_coordinate_shared_sizes():
    assert ModulePartition.per_leaf(PARAMS).num_modules == 3
    assert ModulePartition.shared(PARAMS).num_modules == 1
    per_coord = ModulePartition.per_coordinate(PARAMS)
    assert per_coord.num_modules == per_coord.num_params == 11
    assert sorted(per_coord.index.tolist()) == list(range(11))


def test_group_of_leaves_is_one_module():
    part = ModulePartition.from_labels(PARAMS, {"layer1": {"w": "hidden", "b": "hidden"}, "out": "head"})
    assert part.names == ("hidden", "head")
    np.testing.assert_array_equal(part.module_sizes, [9, 2])
    # the flat vector follows ravel_pytree order; every coordinate of layer1 maps to module 0
    flat = part.ravel({"layer1": {"w": jnp.ones((2, 3)), "b": jnp.ones(3)}, "out": jnp.full(2, 2.0)})
    np.testing.assert_array_equal(np.asarray(flat)[part.index == 1], [2.0, 2.0])


def test_expand_and_module_sum_are_adjoint():
    part = ModulePartition.from_labels(PARAMS, {"layer1": {"w": "a", "b": "b"}, "out": "a"})
    rng = np.random.default_rng(0)
    per_module, per_coord = rng.normal(size=2), rng.normal(size=part.num_params)
    # <expand(u), v> = <u, module_sum(v)>
    lhs = float(jnp.dot(part.expand(jnp.asarray(per_module)), per_coord))
    rhs = float(jnp.dot(per_module, part.module_sum(jnp.asarray(per_coord))))
    assert lhs == pytest.approx(rhs, rel=1e-12)
    # batched module_sum
    batch = jnp.asarray(rng.normal(size=(4, part.num_params)))
    np.testing.assert_allclose(part.module_sum(batch)[2], part.module_sum(batch[2]), rtol=1e-12)


def test_integer_label_arrays_give_coordinate_modules():
    labels = {"layer1": {"w": np.array([[0, 0, 1], [1, 1, 1]]), "b": "bias"}, "out": "bias"}
    part = ModulePartition.from_labels(PARAMS, labels)
    # leaves in ravel order: layer1/b, layer1/w, out; modules numbered by first appearance
    assert part.names == ("bias", "['layer1']['w'][0]", "['layer1']['w'][1]")
    np.testing.assert_array_equal(part.module_sizes, [5, 2, 4])


@pytest.mark.parametrize(
    "labels, match",
    [
        ({"layer1": {"w": "a"}, "out": "b"}, "same structure"),  # layer1/b has no module
        ({"layer1": {"w": "a", "b": None}, "out": "b"}, "same structure|no module"),
        ({"layer1": {"w": np.zeros((3, 2), int), "b": "a"}, "out": "b"}, "shape"),
        ({"layer1": {"w": np.zeros((2, 3)), "b": "a"}, "out": "b"}, "integers"),
    ],
)
def test_partition_that_does_not_cover_the_parameters_is_rejected(labels, match):
    with pytest.raises(ValueError, match=match):
        ModulePartition.from_labels(PARAMS, labels)


def test_ravel_checks_shapes():
    part = ModulePartition.per_leaf(PARAMS)
    bad = {"layer1": {"w": jnp.zeros((3, 2)), "b": jnp.zeros(3)}, "out": jnp.zeros(2)}
    with pytest.raises(ValueError, match=r"has shape \(3, 2\), expected \(2, 3\)"):  # both shapes named
        part.ravel(bad)
    with pytest.raises(ValueError, match="structure"):
        part.ravel({"layer1": jnp.zeros(9), "out": jnp.zeros(2)})


def test_per_coordinate_with_a_scalar_leaf():
    params = {"bias": jnp.asarray(0.5), "w": jnp.arange(3.0)}
    part = ModulePartition.per_coordinate(params)
    assert part.num_params == 4 and part.num_modules == 4
    assert part.index.tolist() == [0, 1, 2, 3]
    assert part.names == ("['bias'][0]", "['w'][0]", "['w'][1]", "['w'][2]")
    flat = part.ravel(params)
    np.testing.assert_array_equal(flat, [0.5, 0.0, 1.0, 2.0])
    back = part.unravel(flat)
    assert back["bias"].shape == () and float(back["bias"]) == 0.5
    assert ModulePartition.per_coordinate(jnp.asarray(2.0)).num_modules == 1  # a lone scalar


def test_labels_that_compare_equal_across_types_stay_apart():
    params = {"a": jnp.zeros(2), "b": jnp.zeros(3), "c": jnp.zeros(1)}
    part = ModulePartition.from_labels(params, {"a": 1, "b": True, "c": 1})
    assert part.names == ("1", "True") and part.index.tolist() == [0, 0, 1, 1, 1, 0]
    with pytest.raises(ValueError, match=r"print alike as \['1'\]"):
        ModulePartition.from_labels(params, {"a": 1, "b": "1", "c": 1})


def test_shared_and_named_partitions_name_their_modules():
    shared = ModulePartition.shared(PARAMS)
    assert shared.names == ("all",) and shared.index.tolist() == [0] * 11
    named = ModulePartition.named(["Intercept", "Days", "Age"])
    assert named.names == ("Intercept", "Days", "Age") and named.index.tolist() == [0, 1, 2]
    assert named.num_params == 3
    np.testing.assert_array_equal(named.ravel((1.0, 2.0, 3.0)), [1.0, 2.0, 3.0])  # flat order = given order
    assert repr(named) == "ModulePartition(num_params=3, modules=['Intercept', 'Days', 'Age'])"


@pytest.mark.parametrize("names, match", [
    ("ab", "must be a sequence of coordinate names, got the string 'ab'"),
    ([], r"^named\(\) needs at least one coordinate name$"),
    (["a", ""], r"non-empty strings, got \[''\]"),
    (["a", 1], r"non-empty strings, got \[1\]"),
    (["a", "b", "a"], r"distinct; repeated: \['a'\]"),
])
def test_named_refuses_bad_names(names, match):
    with pytest.raises(ValueError, match=match):
        ModulePartition.named(names)


def test_from_labels_names_what_is_wrong():
    import re

    def refused(params, labels, message):
        with pytest.raises(ValueError) as err:
            ModulePartition.from_labels(params, labels)
        assert re.fullmatch(message, str(err.value)), str(err.value)

    refused({}, {}, r"params has no array leaves: nothing to partition")
    refused({"a": jnp.zeros(2)}, {"b": "x"}, r"module labels must have the same structure as params \(params: .*\); "
                                             r"every parameter leaf needs a module: .*")
    refused({"a": jnp.zeros(2)}, {"a": [1, 2]}, r"label for \['a'\] is not hashable: \[1, 2\]")
    refused({"a": jnp.zeros(2), "b": jnp.zeros(1)}, {"a": 1, "b": "1"},
            r"different module labels print alike as \['1'\] \(e.g. 1 and '1'\); give each module a distinct label")


def test_a_bare_array_is_one_leaf_named_params_and_the_index_is_int32():
    part = ModulePartition.per_leaf(jnp.zeros(3))
    assert part.names == ("params",) and part.index.tolist() == [0, 0, 0]
    assert part.index.dtype == np.int32 and ModulePartition.per_coordinate(PARAMS).index.dtype == np.int32


def test_check_per_module_broadcasts_a_scalar_and_refuses_another_length():
    part = ModulePartition.per_leaf(PARAMS)  # 3 modules
    got = part.check_per_module(2, "sigma")
    assert got.dtype == float and got.tolist() == [2.0, 2.0, 2.0]
    vector = part.check_per_module([1, 2, 3], "sigma")  # integers in, floats out
    assert vector.dtype == float and vector.tolist() == [1.0, 2.0, 3.0]
    with pytest.raises(ValueError, match=r"^sigma must be a scalar or have shape \(3,\) \(one per module\), "
                                         r"got shape \(2,\)$"):
        part.check_per_module([1.0, 2.0], "sigma")
