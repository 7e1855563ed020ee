"""lme4's model formulas evaluated against a data frame: a :class:`ModelFrame` holding the
:class:`~hiermeta.mixed.terms.MixedDesign` and what ``predict`` needs to evaluate new data.

A formula ``response ~ fixed part + (expr | group) + ...`` (lme4; Bates et al. 2015, section 2.1):

* the *fixed part* is a Wilkinson formula evaluated by ``formulae`` (bambi's engine): numeric
  columns, factors with treatment coding (the first level is the reference; formulae's column
  names, ``f[b]``), interactions ``a:b`` and ``a*b``, transforms (``log(x)``, ``scale(x)``,
  ``I(x**2)``, ``C(k)``), ``offset(z)`` (added to the linear predictor with coefficient 1),
  ``0 +`` or ``- 1`` to drop the intercept (``(Intercept)`` otherwise, lme4's name);
* each *bar term* ``(expr | group)`` is a random-effect term: ``expr`` is evaluated by formulae
  as a model matrix of its own (``1``, ``Days``, ``0 + f``; an intercept unless ``0 +``), with a
  full covariance over its columns; ``(expr || group)`` has a diagonal one (lme4 splits it into
  uncorrelated terms, ``expandDoubleVerts``: the same model for numeric columns);
* ``group`` is a column (a factor: its distinct values are the levels; integer codes are fine),
  an interaction ``a:b`` (the observed combinations), or a nesting ``a/b`` = ``(expr | a) +
  (expr | a:b)`` (``a/b/c`` adds ``a:b:c``).  Several bar terms over different factors are
  crossed or nested as the data make them; the design does not need to be told which;
* the response is a column or a transform of one (``log(y)``); for a binomial model also
  ``cbind(successes, failures)`` (lme4; each argument a column or arithmetic on columns,
  ``cbind(incidence, size - incidence)``) or ``p(successes, trials)`` (bambi), both stored as
  the proportion with the trials as weights, or a two-level factor (the second level is a
  success, as in R's ``glm``).

formulae itself reads ``(Days | Subject)`` as two unrelated terms and does not parse ``||``, so
the bar terms are cut out of the formula's text first (lme4's ``findbars``, which works on the
parse tree) and every part is handed to formulae on its own.  The grouping factors are coded
here (``pandas.factorize``), not by formulae: a factor with thousands of levels never becomes a
dense indicator matrix.

Errors (:class:`~hiermeta.errors.FormulaError`, :class:`~hiermeta.errors.DataDefectError`) are
raised before anything is fitted: a formula without ``~`` or without random-effect terms (a GLM
is the model then), an unknown column, a missing or infinite value in a used column, empty data,
a bar term over something that is not a column.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple, Optional, Sequence

import numpy as np
import pandas as pd

from ..errors import DataDefectError, DesignWarning, FormulaError
from .terms import MixedDesign, Term, make_term

__all__ = ["Bar", "SplitFormula", "split_formula", "ModelFrame", "model_frame", "NewData", "INTERCEPT"]

INTERCEPT = "(Intercept)"  # lme4's name of the intercept column

# functions a formula may call as R users write them (log(x), exp(x), ...), beside formulae's own
# (scale, center, C, I, offset, ...) and NumPy as np
NAMESPACE = {"log": np.log, "log2": np.log2, "log10": np.log10, "log1p": np.log1p, "exp": np.exp,
             "expm1": np.expm1, "sqrt": np.sqrt, "abs": np.abs, "np": np}


class Bar(NamedTuple):
    """One bar term as written: ``expr`` (formulae syntax), the grouping factors it expands to
    (each a tuple of column names: ``("batch", "cask")`` is ``batch:cask``), correlated or not."""

    expr: str
    groups: tuple
    correlated: bool
    text: str


class SplitFormula(NamedTuple):
    """A formula cut into its response, fixed part and bar terms (:func:`split_formula`)."""

    response: str
    fixed: str
    bars: tuple


# ---------------------------------------------------------------------------- the text


def _top_level_split(text: str, separators: str) -> list:
    """``[(sign, piece)]``: ``text`` split at ``separators`` outside parentheses and brackets."""
    pieces, depth, start, sign = [], 0, 0, "+"
    for i, ch in enumerate(text):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
            if depth < 0:
                raise FormulaError(f"unbalanced parentheses in {text!r}")
        elif depth == 0 and ch in separators:
            pieces.append((sign, text[start:i]))
            sign, start = ch, i + 1
    if depth != 0:
        raise FormulaError(f"unbalanced parentheses in {text!r}")
    pieces.append((sign, text[start:]))
    return pieces


def _strip_name(name: str) -> str:
    name = name.strip()
    if len(name) >= 2 and name[0] == name[-1] == "`":
        name = name[1:-1]
    return name


def _bar_of(inner: str, text: str) -> Optional[Bar]:
    """The bar term inside one pair of parentheses, or None if ``inner`` has no top-level ``|``."""
    depth = 0
    for i, ch in enumerate(inner):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "|" and depth == 0:
            correlated = not inner[i + 1: i + 2] == "|"
            expr = inner[:i].strip()
            grouping = inner[i + (1 if correlated else 2):].strip()
            break
    else:
        return None
    if not expr:
        raise FormulaError(f"{text}: nothing left of the bar (write (1 | g) for a random intercept)")
    if not grouping or "|" in grouping:
        raise FormulaError(f"{text}: the grouping factor right of the bar is missing or malformed")
    nest = [p.strip() for s, p in _top_level_split(grouping, "/")]
    groups = []  # a/b/c: a, a:b, a:b:c (lme4's expansion of nesting); a:b alone is one interaction
    for k in range(len(nest)):
        parts = tuple(x.strip() for part in nest[: k + 1] for x in part.split(":"))
        if not all(_is_name(x) for x in parts):
            raise FormulaError(f"{text}: the grouping factor {grouping!r} must be a column, an interaction a:b "
                               "or a nesting a/b of columns")
        groups.append(tuple(_strip_name(x) for x in parts))
    return Bar(expr, tuple(groups), correlated, text.strip())


def _is_name(token: str) -> bool:
    """A column name: a backticked name, or a token without operators or parentheses."""
    token = token.strip()
    if len(token) >= 2 and token[0] == token[-1] == "`":
        return True
    return bool(token) and not any(ch in token for ch in "()[]{}+-*/:~|^, ")


def split_formula(formula: str) -> SplitFormula:
    """Cut ``formula`` into ``response ~ fixed`` and its bar terms (lme4's ``findbars``/``nobars``).

    The fixed part keeps everything that is not a bar term, in order and with its signs (``- 1``,
    ``0 +``); it is ``1`` when only bar terms were given.
    """
    if not isinstance(formula, str):
        raise FormulaError(f"the formula must be a string such as 'y ~ x + (1 | g)', got {type(formula).__name__}")
    pieces = _top_level_split(formula, "~")
    if len(pieces) != 2:
        raise FormulaError(f"the formula {formula!r} needs exactly one '~' with the response on its left")
    response, rhs = pieces[0][1].strip(), pieces[1][1].strip()
    if not response:
        raise FormulaError(f"the formula {formula!r} has no response left of '~'")
    if not rhs:
        raise FormulaError(f"the formula {formula!r} has nothing right of '~'")
    fixed, bars = [], []
    for sign, piece in _top_level_split(rhs, "+-"):
        stripped = piece.strip()
        if not stripped:
            if sign == "-" or fixed or bars:
                continue  # a leading '-' as in '-1 + x' leaves an empty first piece
            continue
        bar = None
        if stripped.startswith("(") and stripped.endswith(")") and _closes_at_end(stripped):
            bar = _bar_of(stripped[1:-1], stripped)
        elif "|" in stripped:
            raise FormulaError(f"{stripped!r}: a random-effect term is written in parentheses, as (x | g)")
        if bar is not None:
            if sign == "-":
                raise FormulaError(f"a random-effect term cannot be subtracted: - {stripped}")
            bars.append(bar)
        else:
            fixed.append(f"{sign} {stripped}" if fixed or sign == "-" else stripped)
    fixed_text = " ".join(fixed) if fixed else "1"
    if fixed_text.startswith("- "):
        fixed_text = "1 " + fixed_text  # '- 1 + x': formulae wants something before the first '-'
    return SplitFormula(response, fixed_text, tuple(bars))


def _closes_at_end(text: str) -> bool:
    """Whether the parenthesis opening ``text`` is the one closing it."""
    depth = 0
    for i, ch in enumerate(text):
        depth += ch == "("
        depth -= ch == ")"
        if depth == 0:
            return i == len(text) - 1
    return False


# ---------------------------------------------------------------------------- the data


def _frame(data) -> pd.DataFrame:
    if isinstance(data, pd.DataFrame):
        df = data
    elif isinstance(data, dict):
        try:
            df = pd.DataFrame(data)
        except ValueError as err:
            raise DataDefectError(f"the data's columns must be 1-D with equal lengths: {err}") from None
    else:
        raise DataDefectError(f"data must be a pandas DataFrame or a dict of columns, got {type(data).__name__}")
    if df.shape[0] == 0:
        raise DataDefectError("the data have no rows")
    if df.columns.duplicated().any():
        raise DataDefectError(f"the data name column(s) {sorted(set(df.columns[df.columns.duplicated()]))} twice")
    return df.reset_index(drop=True)


def _require_columns(df: pd.DataFrame, names, role: str):
    missing = [n for n in names if n not in df.columns]
    if missing:
        cols = list(map(str, df.columns))
        shown = cols if len(cols) <= 20 else cols[:20] + ["..."]
        raise FormulaError(f"{role} names column(s) {missing} not in the data; its columns are {shown}")


def _check_finite(df: pd.DataFrame, names, role: str):
    """A missing (NaN/None) or infinite value in a used column is an error (lme4 would drop the row
    silently by na.omit; here the user decides)."""
    for name in names:
        col = df[name]
        bad = col.isna().to_numpy()
        if pd.api.types.is_numeric_dtype(col) and not pd.api.types.is_bool_dtype(col):
            bad = bad | ~np.isfinite(col.to_numpy(dtype=float, na_value=np.nan))
        if bad.any():
            rows = np.flatnonzero(bad)
            raise DataDefectError(
                f"column {name!r} ({role}) holds {rows.size} missing or infinite value(s) (row positions "
                f"{rows[:10].tolist()}{' ...' if rows.size > 10 else ''}); drop or impute those rows first, "
                "e.g. data.dropna(subset=[...])")


def _variables(formula_text: str) -> list:
    """The data columns a formulae expression reads."""
    import formulae

    try:
        names = formulae.model_description(formula_text).var_names
    except Exception as err:  # formulae's ParseError and friends
        raise FormulaError(f"formulae cannot parse {formula_text!r}: {err}") from None
    return sorted(n for n in names if n)


def _model_matrix(text: str, df: pd.DataFrame, role: str):
    """formulae's common-effects matrix of the right-hand side ``text`` (kept for new data)."""
    import formulae

    try:
        dm = formulae.design_matrices(text, df, na_action="error", extra_namespace=NAMESPACE)
    except Exception as err:
        raise FormulaError(f"cannot evaluate the {role} {text!r}: {type(err).__name__}: {err}") from None
    return dm.common


def _column_names(common) -> tuple:
    """Column names of a formulae matrix (offsets excluded), with lme4's ``(Intercept)``."""
    names = []
    for name, term in common.terms.items():
        if getattr(term, "kind", None) == "offset":
            continue
        names += [INTERCEPT if lab == "Intercept" else lab for lab in term.labels]
    return tuple(names)


def _split_offsets(common, matrix: np.ndarray) -> tuple:
    """``(X, offset)``: formulae puts ``offset(z)`` among the columns; they are taken out and summed."""
    keep = np.ones(matrix.shape[1], dtype=bool)
    offset = np.zeros(matrix.shape[0])
    for name, term in common.terms.items():
        if getattr(term, "kind", None) == "offset":
            sl = common.slices[name]
            offset = offset + matrix[:, sl].sum(axis=1)
            keep[sl] = False
    return np.asarray(matrix[:, keep], dtype=float), offset


def _binomial_response(text: str) -> Optional[tuple]:
    """``(kind, first, second)`` for ``cbind(s, f)`` or ``p(s, n)``, else None."""
    for kind in ("cbind", "p"):
        if text.startswith(kind + "(") and text.endswith(")") and _closes_at_end(text[len(kind):]):
            args = [a.strip() for s, a in _top_level_split(text[len(kind) + 1: -1], ",")]
            if len(args) != 2 or not all(args):
                raise FormulaError(f"{text}: {kind}() takes two columns, e.g. {kind}(successes, "
                                   f"{'failures' if kind == 'cbind' else 'trials'})")
            return kind, args[0], args[1]
    return None


def _numeric_expression(df: pd.DataFrame, text: str) -> np.ndarray:
    """A column, or arithmetic on columns (``size - incidence``), as floats."""
    name = _strip_name(text)
    if name in df.columns:
        return df[name].to_numpy(dtype=float)
    try:
        values = df.eval(text, engine="python")
        return np.asarray(values, dtype=float).reshape(df.shape[0])
    except Exception as err:
        raise FormulaError(f"cannot evaluate {text!r} on the data: {type(err).__name__}: {err}") from None


def _group_codes(df: pd.DataFrame, columns: tuple) -> tuple:
    """``(codes (n,), levels)`` of the factor ``a`` or interaction ``a:b`` (observed combinations,
    ordered by the components' level order; level names joined by ``:``)."""
    parts = []
    for name in columns:
        col = df[name]
        if isinstance(col.dtype, pd.CategoricalDtype):
            codes, uniques = pd.factorize(col.cat.remove_unused_categories(), sort=True)
            uniques = list(uniques.categories[uniques.codes]) if hasattr(uniques, "codes") else list(uniques)
        else:
            if pd.api.types.is_float_dtype(col) and not np.all(np.mod(col.to_numpy(), 1.0) == 0.0):
                warnings.warn(f"grouping column {name!r} is numeric with non-integer values; it is treated as a "
                              f"factor with {col.nunique()} levels (as lme4 does). If it is a covariate, put it "
                              "left of the bar or in the fixed part.", DesignWarning, stacklevel=4)
            try:
                codes, uniques = pd.factorize(col, sort=True)
            except TypeError:  # values that do not sort (mixed types): order of appearance
                codes, uniques = pd.factorize(col, sort=False)
            uniques = list(uniques)
        parts.append((np.asarray(codes, dtype=np.int64), [_python(u) for u in uniques]))
    if len(parts) == 1:
        codes, levels = parts[0]
        return codes, tuple(levels)
    sizes = [len(lv) for _, lv in parts]
    combined = np.ravel_multi_index([c for c, _ in parts], sizes)
    used, codes = np.unique(combined, return_inverse=True)
    idx = np.unravel_index(used, sizes)
    levels = tuple(":".join(str(parts[j][1][idx[j][i]]) for j in range(len(parts))) for i in range(used.size))
    return codes.astype(np.int64), levels


def _python(value):
    return value.item() if isinstance(value, np.generic) else value


class NewData(NamedTuple):
    """New rows evaluated as the model's design: fixed design and offset, and per term the level
    codes (-1 for a level the model has not seen: its effect is the population mean, 0) and columns."""

    X: np.ndarray
    offset: np.ndarray
    codes: list
    Z: list


class ModelFrame:
    """A formula evaluated on its data: the :class:`MixedDesign` and the recipes for new data.

    Attributes:
      formula: the formula as given; split: its :class:`SplitFormula`.
      design: the :class:`MixedDesign` (every row of ``data``, in order).
      data: the data frame (index reset).
      response_note: how the response was read (``"proportion of successes; trials as weights"``...).
    """

    def __init__(self, formula: str, data, family: str = "gaussian", weights=None):
        split = split_formula(formula)
        if not split.bars:
            raise FormulaError(
                f"the formula {formula!r} has no random-effect term such as (1 | group): that is a GLM/linear "
                "model, fitted e.g. by statsmodels.formula.api.glm or ols (or add a term like (1 | g))")
        df = _frame(data)
        self.formula, self.split, self.family = formula, split, family
        binomial = _binomial_response(split.response)
        if binomial is not None and family != "binomial":
            raise FormulaError(f"{split.response} is a binomial response; give family='binomial'")
        fixed_formula = f"{split.response if binomial is None else 'cbind__successes'} ~ {split.fixed}"
        used = [v for v in _variables(fixed_formula) if v != "cbind__successes"]
        if binomial is not None:
            used += _variables(binomial[1]) + _variables(binomial[2])
        _require_columns(df, used, "the fixed part or the response")
        group_cols = sorted({c for bar in split.bars for g in bar.groups for c in g})
        _require_columns(df, group_cols, "a grouping factor")
        expr_vars = {bar.text: _variables(bar.expr) for bar in split.bars}
        for text, names in expr_vars.items():
            _require_columns(df, names, f"the random-effect term {text}")
        weight_col = weights if isinstance(weights, str) else None
        if weight_col is not None:
            _require_columns(df, [weight_col], "weights=")
        all_used = sorted(set(used) | set(group_cols) | {n for v in expr_vars.values() for n in v}
                          | ({weight_col} if weight_col else set()))
        _check_finite(df, all_used, "used by the model")
        self.data, self.used_columns = df, tuple(all_used)
        n = df.shape[0]

        # the fixed part and the response
        import formulae

        if binomial is not None:  # the response is read below; formulae gets a placeholder
            df = df.assign(cbind__successes=0.0)
        try:
            dm = formulae.design_matrices(fixed_formula, df, na_action="error", extra_namespace=NAMESPACE)
        except Exception as err:
            raise FormulaError(f"cannot evaluate {fixed_formula!r}: {type(err).__name__}: {err}") from None
        self._fixed = dm.common
        X, offset = _split_offsets(dm.common, np.asarray(dm.common.design_matrix, dtype=float))
        fixed_names = _column_names(dm.common)
        y, trial_weights, self.response_note = self._response(dm, df, binomial, family)
        w = np.ones(n) if weights is None else self._weights(df, weights, n)
        if trial_weights is not None:
            w = w * trial_weights

        # the random-effect terms
        terms, self._bar_matrices = [], []
        for bar in split.bars:
            common = _model_matrix(bar.expr, df, f"random-effect term {bar.text}")
            Z, z_offset = _split_offsets(common, np.asarray(common.design_matrix, dtype=float))
            if np.any(z_offset):
                raise FormulaError(f"{bar.text}: offset() belongs in the fixed part")
            columns = _column_names(common)
            if not columns:
                raise FormulaError(f"{bar.text}: the term has no columns")
            self._bar_matrices.append(common)
            for group in bar.groups:
                codes, levels = _group_codes(df, group)
                terms.append(make_term(":".join(group), codes, Z, columns, levels, bar.correlated))
        self._term_groups = [group for bar in split.bars for group in bar.groups]
        self._term_bar = [i for i, bar in enumerate(split.bars) for _ in bar.groups]
        name = _strip_name(split.response)
        self.design = MixedDesign(response=y, X=X, fixed_names=fixed_names, terms=tuple(terms), offset=offset,
                                  weights=w, response_name=name)

    @staticmethod
    def _weights(df, weights, n) -> np.ndarray:
        w = df[weights].to_numpy(dtype=float) if isinstance(weights, str) else np.asarray(weights, dtype=float)
        if w.shape != (n,):
            raise DataDefectError(f"weights must be a column or an array of {n} values, got shape {w.shape}")
        if not np.all(np.isfinite(w)) or np.any(w <= 0):
            raise DataDefectError("weights must be finite and positive")
        return w

    @staticmethod
    def _response(dm, df, binomial, family) -> tuple:
        """``(y, trials or None, note)``."""
        if binomial is not None:
            kind, first, second = binomial
            a, b = _numeric_expression(df, first), _numeric_expression(df, second)
            trials = a + b if kind == "cbind" else b
            if np.any(a < 0) or np.any(trials <= 0) or np.any(a > trials):
                raise DataDefectError(f"{kind}({first}, {second}): successes must lie in 0..trials and trials be > 0")
            return a / trials, trials, "proportion of successes; trials as weights"
        resp = np.asarray(dm.response.design_matrix)
        if resp.ndim == 2 and resp.shape[1] == 2 and family == "binomial":
            levels = getattr(dm.response, "levels", None) or ["first", "second"]
            return resp[:, 1].astype(float), None, f"1 = {levels[1]!r}, 0 = {levels[0]!r}"
        if resp.ndim == 2 and resp.shape[1] == 1:
            resp = resp[:, 0]
        if resp.ndim != 1:
            raise FormulaError(f"the response {dm.response.name!r} is a factor with {resp.shape[1]} levels; "
                               "a mixed model needs a numeric response (or a two-level factor for binomial)")
        return resp.astype(float), None, ""

    def term_columns(self, k: int) -> tuple:
        """The data columns of term ``k``'s grouping factor (``("batch", "cask")`` for ``batch:cask``)."""
        return self._term_groups[k]

    def new_data(self, newdata, terms: Sequence[Term]) -> NewData:
        """``newdata`` evaluated as the model's design (treatment coding and ``scale()`` as fitted;
        a new factor level in the fixed part is an error, a new grouping level maps to -1)."""
        df = _frame(newdata)
        try:
            fixed = np.asarray(self._fixed.evaluate_new_data(df).design_matrix, dtype=float)
        except Exception as err:
            raise FormulaError(f"cannot evaluate the fixed part on the new data: {type(err).__name__}: {err}") from None
        X, offset = _split_offsets(self._fixed, fixed)
        codes, Zs = [], []
        for k, term in enumerate(terms):
            common = self._bar_matrices[self._term_bar[k]]
            try:
                Z, _ = _split_offsets(common, np.asarray(common.evaluate_new_data(df).design_matrix, dtype=float))
            except Exception as err:
                raise FormulaError(f"cannot evaluate {term.label()} on the new data: {type(err).__name__}: {err}") from None
            group = self._term_groups[k]
            _require_columns(df, group, f"the grouping factor of {term.label()}")
            if len(group) == 1:
                keys = [_python(v) for v in df[group[0]].to_numpy()]
            else:
                keys = [":".join(str(_python(v)) for v in row) for row in df[list(group)].itertuples(index=False)]
            lookup = {lv: i for i, lv in enumerate(term.levels)}
            if len(group) == 1:  # integer codes read as floats (or the reverse) still match
                lookup.update({str(lv): i for i, lv in enumerate(term.levels)})
            codes.append(np.array([lookup.get(v, lookup.get(str(v), -1)) for v in keys], dtype=np.int64))
            Zs.append(Z)
        return NewData(X, offset, codes, Zs)


def model_frame(formula: str, data, family: str = "gaussian", weights=None) -> ModelFrame:
    """:class:`ModelFrame` of ``formula`` on ``data`` (module docstring)."""
    return ModelFrame(formula, data, family, weights)
