"""Grouped data from a long table: one call from a data frame to hiermeta's tasks.

A long table has one row per observation: a response, a group (the tasks of the model), and
covariates.  :func:`from_table` turns it into the padded per-group arrays the model works on,

    response[t, n], mask[t, n]    row n of group t (mask False marks padding, so groups may differ in size)
    random[t, n, p]               the design of the group's own coefficients theta_t (varying by group)
    fixed[t, n, k]                the design of coefficients shared by every group, unpooled (beta)
    offset[t, n]                  a known term of the mean
    task_covariates[t, q]         group-level predictors: the prior mean of theta_t is phi + z_t gamma

and builds the likelihood's data from them (``likelihood.make_data``).  For the default
linear-Gaussian likelihood this is the linear mixed model

    y_{t,n} = random[t,n] . theta_t + fixed[t,n] . beta + offset[t,n] + e_{t,n},   e ~ N(0, s^2)
    theta_t ~ N(phi + z_t gamma, Sigma)

lme4's ``y ~ (1 + x) * z + w + offset(o) + (1 + x | g)`` with ``random=["1", "x"]``,
``fixed=["w"]``, ``group_covariates=["z"]``, ``offset="o"``.  Designs are padded with 0, never
NaN, and padded entries never reach a density.  Rows are kept in table order within each group
(or sorted by an ``order`` column); groups in order of first appearance (or a categorical
column's categories, or ``groups=``).

Support/query splits (the meta-learners' ``TaskBatch``, held-out scoring), at most one of:

* ``query_fraction=q, seed=s``: in each group, ``min(n - 1, floor(q n + 1/2))`` rows drawn at
  random (a seeded permutation per group) form the query, the rest the support; a group too
  small to give one query row keeps all its rows as support and is reported
  (``empty_query_groups``, and a warning);
* ``query_last=k`` (with ``order=``, e.g. a time column): the last ``k`` rows of each group, for
  forecasting; a group with ``k`` rows or fewer would have no support and is refused;
* ``query=``: a boolean column (or array) marking the query rows, the user's own rule.

pandas is optional: a ``dict`` of equal-length 1-D arrays is a table too.
"""

from __future__ import annotations

import inspect
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping, NamedTuple, Optional, Sequence

import numpy as np

from .errors import HiermetaWarning
from .hierarchy import HierarchicalModel
from .linear_gaussian import linear_gaussian
from .partition import ModulePartition
from .tasks import TaskBatch

__all__ = ["from_table", "GroupedTable", "PaddedArrays", "INTERCEPT"]

INTERCEPT = "1"  # the column name that means "a column of ones" in random= and fixed=
_INTERCEPT_NAME = "Intercept"


class PaddedArrays(NamedTuple):
    """One split's padded per-group arrays (NumPy), the inputs of ``likelihood.make_data``.

    ``response``, ``mask``, ``offset`` (or None) ``(T, N)``; ``random`` ``(T, N, P)``; ``fixed``
    ``(T, N, K)`` or None; ``task_covariates`` ``(T, Q)`` or None; ``extra``: the other columns
    passed to the likelihood, name -> ``(T, N)``; ``rows``: the table row (0-based position) of
    every entry, -1 at padding.
    """

    response: np.ndarray
    mask: np.ndarray
    random: np.ndarray
    fixed: Optional[np.ndarray]
    offset: Optional[np.ndarray]
    task_covariates: Optional[np.ndarray]
    extra: dict
    rows: np.ndarray


class _Rows(NamedTuple):
    """The table's rows sorted by group (and order), long form."""

    code: np.ndarray  # (n,) group index
    response: np.ndarray  # (n,)
    random: np.ndarray  # (n, P)
    fixed: np.ndarray  # (n, K)
    offset: Optional[np.ndarray]  # (n,)
    covariates: np.ndarray  # (T, Q) per group
    extra: dict  # name -> (n,)
    is_query: np.ndarray  # (n,) bool
    position: np.ndarray  # (n,) row position in the original table


@dataclass(frozen=True, eq=False)
class GroupedTable:
    """A long table as hiermeta tasks: the merged data, its support/query split and the names.

    Attributes:
      data: every row of every group (the likelihood's data): for type-II ML and NUTS.
      support, query: the split's two parts.  Without a split ``support`` is ``data`` and
        ``query`` None; ``query`` is None too when some group has no query row (a likelihood's data
        needs a row in every task): ``table.subset(table.query_groups)`` gives one where all have.
      groups: the group names (values of the group column), in task order.
      coordinates: the names of theta's coordinates (``"Intercept"`` for ``"1"``, else the column).
      fixed_names, covariate_names: names of beta's and of the group covariates' coordinates.
      likelihood: the task likelihood the data were built for.
      arrays: ``{"all": ..., "support": ..., "query": ...}`` :class:`PaddedArrays` (NumPy).
      split: how the split was made (a dict: ``kind`` and its settings).
      empty_query_groups: groups left with no query row.
    """

    data: Any
    support: Any
    query: Any
    groups: tuple
    coordinates: tuple
    fixed_names: tuple
    covariate_names: tuple
    likelihood: Any
    arrays: dict
    split: dict
    empty_query_groups: tuple
    _rows: _Rows = field(repr=False)

    # ------------------------------------------------------------------ sizes
    @property
    def num_groups(self) -> int:
        return len(self.groups)

    @property
    def num_rows(self) -> int:
        return int(self._rows.code.shape[0])

    @property
    def query_groups(self) -> tuple:
        """The groups with at least one query row (none without a split)."""
        if "query" not in self.arrays:
            return ()
        has = self.arrays["query"].mask.any(axis=1)
        return tuple(g for g, h in zip(self.groups, has) if h)

    @property
    def group_sizes(self) -> np.ndarray:
        """Rows per group ``(T,)``."""
        return np.bincount(self._rows.code, minlength=self.num_groups)

    # ------------------------------------------------------------------ tasks and model
    @property
    def batch(self) -> TaskBatch:
        """``TaskBatch(support, query)`` for the meta-learners and held-out scoring.

        Raises ``ValueError`` without a split, or when some group has no query row (restrict to
        the others with ``table.subset(...)``).
        """
        if "query" not in self.arrays:
            raise ValueError("this table has no support/query split: give query_fraction=, query_last= or query=")
        if self.empty_query_groups:
            raise ValueError(
                f"group(s) {list(self.empty_query_groups)[:10]} have no query row, and every task of a "
                "TaskBatch needs one: use table.subset(...) on the other groups, or another split"
            )
        return TaskBatch(self.support, self.query)

    def partition(self) -> ModulePartition:
        """One module per coordinate, named by the columns (``ModulePartition.named(coordinates)``)."""
        return ModulePartition.named(self.coordinates)

    def model(self, correlated="all", **kwargs) -> HierarchicalModel:
        """The :class:`~hiermeta.HierarchicalModel` of these data: one module per named coordinate.

        Args:
          correlated: ``"all"`` (every coordinate in one correlated block, lme4's ``(1 + x | g)``;
            nothing to correlate with one coordinate), ``None`` or ``[]`` (independent coordinates,
            lme4's ``(1 | g) + (0 + x | g)``), or explicit blocks of coordinate names.
          kwargs: passed on (``phi_prior``, ``sigma_prior``, ``corr_concentration``, ...);
            ``num_task_covariates`` is set from the group covariates.
        """
        if "num_task_covariates" in kwargs:
            raise ValueError("num_task_covariates is set by the table's group covariates; do not pass it")
        if isinstance(correlated, str):
            if correlated != "all":
                raise ValueError(f"correlated must be 'all', None or a list of blocks of names, got {correlated!r}")
            blocks = [tuple(self.coordinates)] if len(self.coordinates) > 1 else []
        else:
            blocks = list(correlated or [])
        return HierarchicalModel(self.likelihood, self.partition(), correlated=blocks,
                                 num_task_covariates=len(self.covariate_names), **kwargs)

    def subset(self, groups: Sequence) -> "GroupedTable":
        """The same table restricted to ``groups`` (names, in the order given)."""
        groups = list(groups)
        lookup = {g: i for i, g in enumerate(self.groups)}
        unknown = [g for g in groups if g not in lookup]
        if unknown:
            raise ValueError(f"subset names unknown group(s) {unknown[:10]}")
        if not groups:
            raise ValueError("subset needs at least one group")
        if len(set(groups)) != len(groups):
            raise ValueError("subset names a group more than once")
        old = np.array([lookup[g] for g in groups])
        recode = np.full(self.num_groups, -1)
        recode[old] = np.arange(len(groups))
        rows = self._rows
        keep = recode[rows.code] >= 0
        new_code = recode[rows.code[keep]]
        order = np.argsort(new_code, kind="stable")
        pick = lambda a: None if a is None else a[keep][order]
        sub = _Rows(new_code[order], pick(rows.response), pick(rows.random), pick(rows.fixed), pick(rows.offset),
                    rows.covariates[old], {k: pick(v) for k, v in rows.extra.items()}, pick(rows.is_query),
                    pick(rows.position))
        return _assemble(sub, tuple(groups), self.coordinates, self.fixed_names, self.covariate_names,
                         self.likelihood, self.split, warn=False)

    def __repr__(self) -> str:
        sizes = self.group_sizes
        split = self.split.get("kind", "none")
        return (f"GroupedTable({self.num_groups} groups of {sizes.min()}-{sizes.max()} rows, "
                f"coordinates={list(self.coordinates)}, fixed={list(self.fixed_names)}, "
                f"group covariates={list(self.covariate_names)}, split={split})")


# ---------------------------------------------------------------------------- reading the table


def _columns_of(table) -> list:
    if hasattr(table, "columns") and hasattr(table, "__getitem__"):  # a pandas DataFrame (duck-typed)
        return list(table.columns)
    if isinstance(table, Mapping):
        return list(table.keys())
    raise ValueError(
        f"table must be a pandas DataFrame or a dict of equal-length 1-D arrays, got {type(table).__name__}"
    )


def _raw(table, name):
    col = table[name]
    is_categorical = str(getattr(col, "dtype", "")) == "category"
    if hasattr(col, "to_numpy"):
        return col, is_categorical
    return np.asarray(col), False


def _numeric(table, name: str, role: str, n: int) -> np.ndarray:
    """A numeric column as float64 ``(n,)``, refusing text, missing and infinite values."""
    col, _ = _raw(table, name)
    if type(col).__module__.startswith("pandas"):  # nullable dtypes carry pd.NA; bool is numeric here
        import pandas as pd

        if not (pd.api.types.is_numeric_dtype(col.dtype) or pd.api.types.is_bool_dtype(col.dtype)):
            raise ValueError(f"{role} column {name!r} is not numeric (dtype {col.dtype}): encode it as numbers "
                             "(e.g. pandas.get_dummies for a categorical covariate)")
        values = col.to_numpy(dtype=float, na_value=np.nan)
    else:  # a NumPy array, a list, or another library's column
        values = np.asarray(col.to_numpy() if hasattr(col, "to_numpy") else col)
        if values.dtype.kind not in "biuf":
            raise ValueError(f"{role} column {name!r} is not numeric (dtype {values.dtype}): encode it as numbers")
        values = values.astype(float)
    if values.ndim != 1 or values.shape[0] != n:
        raise ValueError(f"{role} column {name!r} must be 1-D with {n} rows, got shape {values.shape}")
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        raise ValueError(f"{role} column {name!r} holds {bad.size} NaN or infinite value(s) "
                         f"(row positions {bad[:10].tolist()}); drop or impute those rows first")
    return values


def _python(value):
    return value.item() if isinstance(value, np.generic) else value


def _group_codes(table, name: str, n: int, groups: Optional[Sequence]) -> tuple[np.ndarray, tuple]:
    col, categorical = _raw(table, name)
    values = col.to_numpy() if hasattr(col, "to_numpy") else np.asarray(col)
    if values.ndim != 1 or values.shape[0] != n:
        raise ValueError(f"group column {name!r} must be 1-D with {n} rows, got shape {values.shape}")
    missing = [i for i, v in enumerate(values) if v is None or (isinstance(v, float) and math.isnan(v))
               or type(v).__name__ in ("NAType", "NaTType")]
    if missing:
        raise ValueError(f"group column {name!r} holds {len(missing)} missing value(s) "
                         f"(row positions {missing[:10]}); every row needs a group")
    if groups is None and categorical:
        groups = list(col.cat.categories)
    lookup: dict = {}
    if groups is not None:
        groups = [_python(g) for g in groups]
        for g in groups:
            if g in lookup:
                raise ValueError(f"groups= names group {g!r} twice")
            lookup[g] = len(lookup)
        try:
            codes = np.fromiter((lookup[_python(v)] for v in values), dtype=np.int64, count=n)
        except KeyError as err:
            raise ValueError(f"group column {name!r} holds group {err.args[0]!r}, which groups= (or the "
                             "column's categories) does not list") from None
        empty = [g for g, c in zip(groups, np.bincount(codes, minlength=len(groups))) if c == 0]
        if empty:
            raise ValueError(f"group(s) {empty[:10]} have no rows (listed in groups= or unused categories of a "
                             "categorical group column: remove them, e.g. .cat.remove_unused_categories())")
        return codes, tuple(groups)
    try:
        codes = np.fromiter((lookup.setdefault(_python(v), len(lookup)) for v in values), dtype=np.int64, count=n)
    except TypeError as err:
        raise ValueError(f"group column {name!r} holds a value that cannot name a group: {err}") from None
    return codes, tuple(lookup)


def _check_names(names, role: str, allow_intercept: bool) -> list:
    if names is None:
        return []
    if isinstance(names, (str, bytes)):
        names = [names]
    names = list(names)
    repeated = sorted({str(n) for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"{role} names column(s) {repeated} more than once")
    if not allow_intercept and INTERCEPT in names:
        raise ValueError(f"{role} cannot hold the intercept {INTERCEPT!r}")
    return names


def _split_flags(table, n, perm, codes, group_names, order_key, query_fraction, query_last, query, seed):
    """``(is_query (n,), description)`` for the rows sorted by ``perm`` (by group, then order)."""
    given = [x is not None for x in (query_fraction, query_last, query)]
    if sum(given) > 1:
        raise ValueError("give at most one of query_fraction=, query_last= and query=")
    T = len(group_names)
    is_query = np.zeros(n, dtype=bool)
    sizes = np.bincount(codes, minlength=T)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    if query_fraction is not None:
        if isinstance(query_fraction, bool) or not isinstance(query_fraction, (int, float, np.number)) \
                or not 0.0 < float(query_fraction) < 1.0:
            raise ValueError(f"query_fraction must be a number in (0, 1), got {query_fraction!r}")
        q = float(query_fraction)
        rng = np.random.default_rng(seed)
        for t in range(T):
            k = min(sizes[t] - 1, int(math.floor(q * sizes[t] + 0.5)))
            is_query[starts[t] + rng.permutation(sizes[t])[:k]] = True
        return is_query, {"kind": "fraction", "query_fraction": q, "seed": seed}
    if query_last is not None:
        if isinstance(query_last, bool) or int(query_last) != query_last or query_last < 1:
            raise ValueError(f"query_last must be an integer >= 1, got {query_last!r}")
        k = int(query_last)
        if order_key is None:
            raise ValueError("query_last= needs order= (the column whose last values form the query, e.g. time)")
        short = [group_names[t] for t in np.flatnonzero(sizes <= k)]
        if short:
            raise ValueError(f"query_last={k} leaves group(s) {short[:10]} without support data "
                             f"(they have {k} rows or fewer)")
        for t in range(T):
            is_query[starts[t] + sizes[t] - k: starts[t] + sizes[t]] = True
        return is_query, {"kind": "last", "query_last": k, "order": order_key}
    if query is None:
        return is_query, {"kind": "none"}
    if isinstance(query, str):
        _require(table, [query], "query")
        flags, label = _raw(table, query)[0], query
        flags = flags.to_numpy() if hasattr(flags, "to_numpy") else np.asarray(flags)
    else:
        flags, label = np.asarray(query), "given array"
    if flags.shape != (n,) or flags.dtype != bool:
        raise ValueError(f"query= must be a boolean column or array with {n} rows, got dtype "
                         f"{flags.dtype} and shape {flags.shape}")
    is_query = flags[perm]
    no_support = [group_names[t] for t in range(T) if np.all(is_query[codes == t])]
    if no_support:
        raise ValueError(f"the query rule leaves group(s) {no_support[:10]} without support data "
                         "(every group needs at least one support row)")
    return is_query, {"kind": "rule", "query": label}


def _require(table, names, role):
    columns = _columns_of(table)
    for name in names:
        if name not in columns:
            raise ValueError(f"column {name!r} ({role}) is not in the table; its columns are {columns}")


def from_table(
    table,
    *,
    response: str,
    group: str,
    random: Sequence[str] = (INTERCEPT,),
    fixed: Sequence[str] = (),
    group_covariates: Sequence[str] = (),
    offset: Optional[str] = None,
    likelihood=None,
    order: Optional[str] = None,
    groups: Optional[Sequence] = None,
    query_fraction: Optional[float] = None,
    query_last: Optional[int] = None,
    query=None,
    seed: int = 0,
    warn: bool = True,
    **columns: str,
) -> GroupedTable:
    """Tasks from a long table (a pandas DataFrame or a dict of equal-length 1-D arrays).

    Args:
      response: the response column.
      group: the grouping column (any hashable values; each distinct value is one task).
      random: columns whose coefficients vary by group (theta's coordinates); ``"1"`` is the
        intercept (a column of ones, named ``"Intercept"``).
      fixed: columns whose coefficients are shared by all groups and unpooled (``beta``: the
        likelihood's ``num_fixed`` must equal their number; the default likelihood takes it).
      group_covariates: columns constant within each group (checked): the task covariates
        ``z_t``, so the prior mean of theta_t is ``phi + z_t gamma``.
      offset: a column added to the mean with coefficient 1.
      likelihood: the task likelihood; default ``hm.linear_gaussian(noise="learned",
        num_fixed=len(fixed))``.  It must have ``make_data(response, mask, random, fixed, offset,
        task_covariates, **columns)``.
      order: a numeric column that orders the rows within each group (e.g. time); default the
        table's order.
      groups: the groups in task order (every one must have rows; default: order of first
        appearance, or a categorical column's categories).
      query_fraction, seed / query_last / query: the support/query split (module docstring).
      warn: warn (:class:`~hiermeta.errors.HiermetaWarning`) when a split leaves groups without a query row.
      columns: further columns the likelihood needs, passed padded ``(T, N)`` to ``make_data``
        under the keyword given (e.g. ``trials="n"`` for a binomial family, ``noise_scale="se"``
        for known relative noise scales).

    Raises ``ValueError`` naming the problem, before anything is compiled: a missing column, a
    NaN or infinite value in a used column, a non-numeric covariate, a group with no rows, a
    group covariate that varies within a group, linearly dependent population-level columns, a
    split that leaves a group without support data.
    """
    names = _columns_of(table)
    random = _check_names(random, "random", True)
    fixed = _check_names(fixed, "fixed", True)
    covs = _check_names(group_covariates, "group_covariates", False)
    if not random:
        raise ValueError("random= needs at least one column (\"1\" for a random intercept)")
    both = sorted(set(random) & set(fixed))
    if both:
        raise ValueError(f"column(s) {both} are in both random= and fixed=: a random coefficient's population "
                         "mean (phi) already plays the fixed effect's part")
    if isinstance(group, (list, tuple)):
        raise ValueError(f"group={list(group)!r}: from_table builds tasks of one grouping factor; for several (crossed or "
                         "nested) use the formula path, hiermeta.mixed.mixed_model('y ~ x + (1 | a) + (1 | b)', data)")
    for role, value in (("response", response), ("group", group)):
        if not isinstance(value, str):
            raise ValueError(f"{role}= must be a column name, got {value!r}")
    _check_roles(names, response, group, random, fixed, covs, offset)
    reserved = {"response", "mask", "random", "fixed", "offset", "task_covariates"}
    clash = sorted(set(columns) & reserved)
    if clash:
        raise ValueError(f"extra column keyword(s) {clash} are make_data's own arguments")
    used = [(response, "response"), (group, "group")]
    used += [(c, "random") for c in random if c != INTERCEPT] + [(c, "fixed") for c in fixed if c != INTERCEPT]
    used += [(c, "group_covariates") for c in covs]
    used += [(offset, "offset")] if offset is not None else []
    used += [(order, "order")] if order is not None else []
    used += [(c, f"{k}=") for k, c in columns.items()]
    for name, role in used:
        _require(table, [name], role)
        if names.count(name) > 1:
            raise ValueError(f"the table has {names.count(name)} columns named {name!r} ({role}); column names must be "
                             "unique (rename or drop the copies, e.g. df.loc[:, ~df.columns.duplicated()])")
    if not names:
        raise ValueError("the table has no columns")
    if isinstance(table, Mapping):
        lengths = {k: np.shape(table[k])[0] if np.ndim(table[k]) == 1 else None for k in {n for n, _ in used}}
        flat = sorted(k for k, v in lengths.items() if v is None)
        if flat:
            raise ValueError(f"the table's columns must be 1-D arrays; {flat} are not")
        if len(set(lengths.values())) != 1:
            raise ValueError(f"the table's columns must have equal lengths; got {lengths}")
    n = len(np.asarray(_raw(table, response)[0]))
    if n == 0:
        raise ValueError("the table has no rows")

    y = _numeric(table, response, "response", n)
    codes, group_names = _group_codes(table, group, n, groups)
    T = len(group_names)
    ones = np.ones(n)
    Z = np.stack([ones if c == INTERCEPT else _numeric(table, c, "random", n) for c in random], axis=-1)
    X = (np.stack([ones if c == INTERCEPT else _numeric(table, c, "fixed", n) for c in fixed], axis=-1)
         if fixed else np.zeros((n, 0)))
    off = _numeric(table, offset, "offset", n) if offset is not None else None
    extra = {k: _numeric(table, c, f"{k}=", n) for k, c in columns.items()}
    zcols = np.stack([_numeric(table, c, "group_covariates", n) for c in covs], -1) if covs else np.zeros((n, 0))
    order_values = _numeric(table, order, "order", n) if order is not None else np.zeros(n)

    # rows sorted by group, then by the order column, then by table position (stable)
    perm = np.lexsort((np.arange(n), order_values, codes))
    is_query, description = _split_flags(table, n, perm, codes[perm], group_names, order, query_fraction,
                                         query_last, query, seed)

    # group covariates: one value per group (its first row's), constant within it
    first_row = np.full(T, n)
    np.minimum.at(first_row, codes, np.arange(n))
    per_group = zcols[first_row]
    varies = zcols != per_group[codes]
    for q, c in enumerate(covs):
        bad = np.unique(codes[varies[:, q]])
        if bad.size:
            raise ValueError(f"group covariate {c!r} varies within group(s) {[group_names[t] for t in bad[:10]]}; "
                             "a group covariate must be constant within each group (else put it in random= or fixed=)")

    for values, labels in ((y[:, None], [f"response {response!r}"]), (Z, [f"random column {c!r}" for c in random]),
                           (X, [f"fixed column {c!r}" for c in fixed]), (zcols, [f"group covariate {c!r}" for c in covs]),
                           (off[:, None] if off is not None else np.zeros((n, 0)), [f"offset {offset!r}"])):
        _check_magnitude(values, labels)
    coordinates = tuple(_INTERCEPT_NAME if c == INTERCEPT else str(c) for c in random)
    fixed_names = tuple(_INTERCEPT_NAME if c == INTERCEPT else str(c) for c in fixed)
    if len(set(coordinates)) != len(coordinates):
        raise ValueError(f"random= gives two coordinates the name {_INTERCEPT_NAME!r} (the column 'Intercept' and \"1\")")
    _check_rank(Z, X, zcols, coordinates, fixed_names, tuple(map(str, covs)))

    if likelihood is None:
        likelihood = linear_gaussian(noise="learned", num_fixed=len(fixed))
    if not callable(getattr(likelihood, "make_data", None)):
        raise ValueError(f"{type(likelihood).__name__} has no make_data(response, mask, random, ...) method: "
                         "from_table needs one to build its data")
    _check_keywords(likelihood.make_data, columns)
    K = getattr(likelihood, "num_fixed", None)
    if K is not None and K != len(fixed):
        raise ValueError(f"the likelihood has num_fixed={K} but fixed= names {len(fixed)} column(s)")

    rows = _Rows(codes[perm], y[perm], Z[perm], X[perm], None if off is None else off[perm], per_group,
                 {k: v[perm] for k, v in extra.items()}, is_query, perm)
    return _assemble(rows, group_names, coordinates, fixed_names, tuple(map(str, covs)), likelihood,
                     description, warn=warn)


def _check_roles(names, response, group, random, fixed, covs, offset) -> None:
    """Refuse a column in two roles that exclude each other, and an intercept ``"1"`` that a column shadows."""
    if group == response:
        raise ValueError(f"column {group!r} is both the response and the group: the groups must be another column")
    for role, listed in (("random=", random), ("fixed=", fixed), ("group_covariates=", covs),
                         ("offset=", [] if offset is None else [offset])):
        if response in listed:
            raise ValueError(f"the response {response!r} is also in {role}: a column cannot explain itself "
                             "(its coefficient would fit the response exactly)")
    if INTERCEPT in names and (INTERCEPT in random or INTERCEPT in fixed):
        raise ValueError(f"the table has a column named {INTERCEPT!r}, and {INTERCEPT!r} in random= or fixed= means the "
                         "intercept (a column of ones), not that column: rename the column "
                         f"(e.g. df.rename(columns={{{INTERCEPT!r}: 'x1'}})) so that {INTERCEPT!r} is unambiguous")


# values beyond these overflow (or underflow to 0) when squared in float64, as every fit's sums of squares do
_HUGE, _TINY = float(np.sqrt(np.finfo(float).max)), float(np.sqrt(np.finfo(float).tiny))


def _check_magnitude(values: np.ndarray, labels) -> None:
    """Refuse columns whose squares overflow or vanish in float64 (rescale them), naming them."""
    largest = np.max(np.abs(values), axis=0) if values.shape[0] else np.zeros(values.shape[1])
    for label, top in zip(labels, largest):
        if top > _HUGE or 0 < top < _TINY:
            raise ValueError(
                f"{label} has values of magnitude up to {top:.3g}: their squares "
                f"{'overflow' if top > 1 else 'underflow to 0'} in float64, so no fit can use it; rescale it "
                "(e.g. divide by its standard deviation, or change its unit)")


def _check_keywords(make_data, columns) -> None:
    """Refuse extra column keywords ``make_data`` does not take (e.g. a misspelt argument)."""
    try:
        params = inspect.signature(make_data).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    unknown = sorted(set(columns) - set(params))
    if unknown:
        takes = [n for n in params if n not in ("self", "response", "mask", "random", "fixed", "offset",
                                                  "task_covariates")]
        raise ValueError(f"from_table got unknown keyword(s) {unknown}: neither its own arguments nor columns "
                         f"the likelihood's make_data takes ({takes})")


def _check_rank(Z, X, zq, coordinates, fixed_names, covariate_names) -> None:
    """Refuse linearly dependent population-level columns: phi (Z), gamma (z_q Z_p), beta (X)."""
    blocks, labels = [Z], list(coordinates)
    if zq.shape[1]:
        blocks.append((zq[:, :, None] * Z[:, None, :]).reshape(Z.shape[0], -1))
        labels += [f"{c}:{p}" if p != _INTERCEPT_NAME else c for c in covariate_names for p in coordinates]
    if X.shape[1]:
        blocks.append(X)
        labels += [f"{f} (fixed)" for f in fixed_names]
    A = np.concatenate(blocks, axis=1)
    for spread in (lambda a: np.max(np.abs(a), axis=0), lambda a: np.sqrt(np.mean(a**2, axis=0))):
        scale = spread(A)  # the largest value first, so that no square overflows or underflows; then the rms
        A = A / np.where(scale > 0, scale, 1.0)
    if np.linalg.matrix_rank(A) == A.shape[1]:
        return
    dependent, kept = [], []
    for j in range(A.shape[1]):
        if np.linalg.matrix_rank(A[:, kept + [j]]) == len(kept) + 1:
            kept.append(j)
        else:
            dependent.append(labels[j])
    raise ValueError(f"the population-level columns are linearly dependent: {dependent} are combinations of "
                     f"the columns before them in {labels}; their coefficients are not identifiable")


def _pad(rows: _Rows, take: np.ndarray, T: int):
    """Padded arrays of the rows selected by ``take`` (sorted by group), for ``T`` groups."""
    code = rows.code[take]
    sizes = np.bincount(code, minlength=T)
    N = max(int(sizes.max()), 1)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    slot = np.arange(code.shape[0]) - starts[code]

    def fill(values, trailing=()):
        out = np.zeros((T, N) + trailing)
        out[code, slot] = values
        return out

    mask = np.zeros((T, N), dtype=bool)
    mask[code, slot] = True
    position = np.full((T, N), -1, dtype=np.int64)
    position[code, slot] = rows.position[take]
    P, K, Q = rows.random.shape[1], rows.fixed.shape[1], rows.covariates.shape[1]
    return PaddedArrays(
        response=fill(rows.response[take]),
        mask=mask,
        random=fill(rows.random[take], (P,)),
        fixed=fill(rows.fixed[take], (K,)) if K else None,
        offset=None if rows.offset is None else fill(rows.offset[take]),
        task_covariates=rows.covariates if Q else None,
        extra={k: fill(v[take]) for k, v in rows.extra.items()},
        rows=position,
    )


def _make(likelihood, arrays: PaddedArrays, where: str):
    try:
        return likelihood.make_data(arrays.response, arrays.mask, arrays.random, fixed=arrays.fixed,
                                    offset=arrays.offset, task_covariates=arrays.task_covariates, **arrays.extra)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


def _assemble(rows: _Rows, groups, coordinates, fixed_names, covariate_names, likelihood, split,
              warn: bool) -> GroupedTable:
    T = len(groups)
    everything = np.ones(rows.code.shape[0], dtype=bool)
    arrays = {"all": _pad(rows, everything, T)}
    data = _make(likelihood, arrays["all"], "the table's data")
    support, query, empty = data, None, ()
    if split["kind"] != "none":
        arrays["support"] = _pad(rows, ~rows.is_query, T)
        support = _make(likelihood, arrays["support"], "the support split")
        n_query = np.bincount(rows.code[rows.is_query], minlength=T)
        empty = tuple(groups[t] for t in np.flatnonzero(n_query == 0))
        if len(empty) == T:
            raise ValueError("the split leaves every query empty")
        arrays["query"] = _pad(rows, rows.is_query, T)
        query = None if empty else _make(likelihood, arrays["query"], "the query split")
        if empty and warn:
            warnings.warn(f"the split leaves {len(empty)} group(s) without a query row: {list(empty)[:10]} "
                          "(they are left out of held-out scores; table.batch needs table.subset(...))",
                          HiermetaWarning, stacklevel=3)
    return GroupedTable(data=data, support=support, query=query, groups=tuple(groups), coordinates=coordinates,
                        fixed_names=fixed_names, covariate_names=covariate_names, likelihood=likelihood,
                        arrays=arrays, split=split, empty_query_groups=empty, _rows=rows)
