"""Restricted expressions over event data: cuts, derived features, weights.

Spec layer: :func:`parse` turns the text of a spec field (``data.cut``,
``data.derived.*``, ``data.weight``) into an :class:`Expression` and reports
every problem as :class:`~mlaas.errors.ExpressionError`. Data layer:
:meth:`Expression.evaluate` runs it, vectorised with numpy/awkward, on one
chunk of arrays (name -> array with one entry per event, flat or jagged).

The text is parsed with Python's ``ast`` and only the constructs below are
accepted; nothing is ever passed to ``eval``. Grammar::

    literal     1   2.5   1e3   True   False
    name        MET_pt  Jet_pt  nMuon          (letters, digits, underscore)
    arithmetic  a + b   a - b   a * b   a / b   a // b   a % b   a ** b   -a  +a
    comparison  <  <=  >  >=  ==  !=           chained: 0 < x < 5 == (0 < x) & (x < 5)
    logic       a & b   a | b   ~a             elementwise; also: a and b, a or b, not a
    call        f(a, ...)                      only the functions in the table below
    element     Jet_pt[0]   Jet_pt[-1]         one element of each event's list, missing if short

Logic operators work elementwise on booleans (non-zero numbers count as true);
``and``/``or``/``not`` are the same and never short-circuit. Bits are tested
with ``bitwise_and(Jet_jetId, 4) > 0``: ``&`` stays logical (what trained
models' expressions meant), so ``&`` or ``|`` with a whole-number literal
other than 0 and 1 (``Jet_jetId & 4``, true for any non-zero id) is refused
and points there. Booleans in arithmetic count as 0/1 and ``**`` always gives
float64 (so ``n ** -1`` works). Division by zero gives inf/nan silently; the
data layer counts those. Precedence is Python's: ``&`` and ``|`` bind tighter
than comparisons, so ``nJet > 9 & (MET_pt < 0.5)`` would compare ``nJet``
with ``9 & (MET_pt < 0.5)``, a silent wrong selection. An ``&``, ``|`` or
``~`` written unparenthesised next to a comparison is therefore an error that
shows the parentheses to write: ``(nJet > 9) & (MET_pt < 0.5)``. Both
refusals guard specs being written; an exported bundle's expressions were
accepted when it was made and are read back without them (``strict=False``).

Elementwise functions (numpy ufuncs; jagged inputs stay jagged, and a flat
value broadcasts into each event's list, e.g. ``Jet_px - MET_px``)::

    abs sqrt exp log log10 sin cos tan arcsin arccos arctan sinh cosh tanh
    floor ceil sign isnan isfinite               one argument
    bitwise_and(a, b)  bitwise_or(a, b)          bits of integers: bitwise_and(Jet_jetId, 4) > 0
    arctan2(y, x)  hypot(a, b)  minimum(a, b)  maximum(a, b)
    where(cond, a, b)                            a where cond is true, else b

Reductions over the innermost list of a jagged collection, one value per event
(a flat argument is an error)::

    sum(x)     0 for an empty list; sum(Jet_pt > 30) counts the true ones
    count(x)   number of elements, true or not: count(Jet_pt > 30) == count(Jet_pt)
    any(x)     False for an empty list        all(x)   True for an empty list
    mean(x)  max(x)  min(x)                   NaN for an empty list, or
    mean(x, d)  max(x, d)  min(x, d)          d for an empty list, e.g. max(Jet_pt, 0)

An expression without names (``2 * 3``) evaluates to a scalar; callers
broadcast it.
"""

from __future__ import annotations

import ast
import functools
import keyword
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import awkward as ak
import numpy as np

from mlaas.errors import ExpressionError, close_names

#: Held around every use of CPython's ``ast`` in mlaas (parsing expressions here,
#: ``np.load``'s header parse in ``data.cache``): CPython 3.11's AST constructor
#: keeps its recursion depth in state shared by threads, and two threads inside
#: it at once fail now and then with "SystemError: AST constructor recursion
#: depth mismatch" (CPython gh-106905). The server parses specs in a thread pool;
#: an epoch's reader threads open cache entries.
AST_LOCK = threading.Lock()

__all__ = ["ELEMENTWISE", "FUNCTIONS", "REDUCTIONS", "Expression", "is_identifier", "parse",
           "unknown_names_message"]

Evaluator = Callable[[Mapping[str, Any]], Any]

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _where(cond: Any, a: Any, b: Any) -> Any:
    """Numpy-style where; awkward's own ak.where would not broadcast a flat cond into lists."""
    if not any(isinstance(v, ak.Array) for v in (cond, a, b)):
        result = np.where(cond, a, b)
        return result[()] if result.ndim == 0 else result
    if not isinstance(cond, ak.Array) and np.ndim(cond) == 0:
        return a if cond else b
    arrays = [v for v in (cond, a, b) if isinstance(v, ak.Array)]
    if all(v.ndim == 1 for v in arrays) and any(_has_missing(v) for v in arrays):
        return _where_missing(cond, a, b)
    return ak.where(*ak.broadcast_arrays(cond, a, b))


def _has_missing(x: Any) -> bool:
    return isinstance(x, ak.Array) and isinstance(x.layout, (
        ak.contents.IndexedOptionArray, ak.contents.ByteMaskedArray,
        ak.contents.BitMaskedArray, ak.contents.UnmaskedArray))


def _where_missing(cond: Any, a: Any, b: Any) -> ak.Array:
    """where() with missing values (``Jet_pt[0]`` of an event without jets): missing only
    where the branch taken is, so ``where(count(Jet_pt) > 0, Jet_pt[0], 0)`` fills them.

    Not through ``ak.broadcast_arrays``, which makes every input missing
    wherever one is; scalars and flat arrays broadcast by themselves here.
    """
    def none(v: Any) -> Any:
        return ak.is_none(v) if _has_missing(v) else False

    def filled(v: Any, value: Any) -> Any:
        return ak.fill_none(v, value) if _has_missing(v) else v

    take_a = filled(cond, False)
    missing = none(cond) | (take_a & none(a)) | (~take_a & none(b))
    value = ak.where(take_a, filled(a, 0), filled(b, 0))
    return ak.mask(value, ~missing) if isinstance(missing, ak.Array) else value


def _nan_test(ufunc: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """isnan/isfinite with a missing value counted as NaN (it becomes one as a feature)."""
    def test(x: Any) -> Any:
        if isinstance(x, ak.Array) and x.ndim == 1 and _has_missing(x):
            x = ak.fill_none(ak.values_astype(x, np.float64), np.nan)
        return ufunc(x)
    return test


def _numeric(x: Any) -> Any:
    """Numbers for arithmetic as Python would see them.

    Booleans count as 0/1 (numpy would make True + True True), and integers
    narrower than 64 bits, or unsigned, become int64: ``nJet - nMuon`` or
    ``-run`` is negative where it should be, and ``i8 + 100`` does not wrap
    around (NanoAOD's counters, ids and ``run``/``event`` are unsigned and
    narrow). A uint64 array with values from 2**63 on stays as it is (a
    bitmask), rather than turning negative.
    """
    if isinstance(x, (bool, np.bool_, np.integer)):
        return int(x)
    if isinstance(x, np.ndarray):
        return x.astype(np.int64) if _widened(x.dtype, x) else x
    if isinstance(x, ak.Array):
        kind = _primitive(x)
        if kind is not None and _widened(np.dtype(kind), x):
            return ak.values_astype(x, np.int64)
    return x


def _widened(dtype: np.dtype, values: Any) -> bool:
    """Whether integers of ``dtype`` go to int64 for arithmetic (see :func:`_numeric`)."""
    if dtype == np.bool_ or (dtype.kind in "iu" and dtype.itemsize < 8):
        return True
    if dtype == np.uint64:
        top = ak.max(values, axis=None) if isinstance(values, ak.Array) else (
            values.max() if values.size else 0)
        return top is None or int(top) < 2**63
    return False


def _arithmetic(ufunc: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    return lambda a, b: ufunc(_numeric(a), _numeric(b))


def _dividing(ufunc: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    """``//`` and ``%``: in integers, exactly, unless a divisor is zero.

    numpy's integer versions give 0 for a division by zero, silently; then
    the operation is done in float64, where it is inf or nan, which pass 1
    counts. Integers stay integers otherwise, so 64-bit bitmasks and event
    numbers beyond 2**53 decode exactly (``(bits // 8) % 2``).
    """
    def divide(a: Any, b: Any) -> Any:
        a, b = _numeric(a), _numeric(b)
        if _is_integer(a) and _is_integer(b) and not _has_zero(b):
            return ufunc(a, b)
        return ufunc(_float(a), _float(b))
    return divide


def _bitwise(ufunc: Callable[[Any, Any], Any], name: str) -> Callable[[Any, Any], Any]:
    """``bitwise_and``/``bitwise_or`` of integers (booleans as 0/1), refused on floats.

    numpy's own refusal names ufuncs and dtypes; a physicist passing
    ``Jet_jetId[0]`` (a float, NaN where there is no jet) needs to hear why.
    """
    def bits(a: Any, b: Any) -> Any:
        a, b = _numeric(a), _numeric(b)
        if not (_is_integer(a) and _is_integer(b)):
            raise TypeError(f"{name}() takes integers (ids, flags, bitmasks); a value here is "
                            "not one (a float, or an element of a list: Jet_jetId[0] is NaN "
                            "where there is no jet)")
        return ufunc(a, b)
    return bits


def _is_integer(x: Any) -> bool:
    if isinstance(x, (int, np.integer)):
        return not isinstance(x, bool)
    if isinstance(x, ak.Array):
        return (_primitive(x) or "").startswith(("int", "uint"))
    return isinstance(x, np.ndarray) and x.dtype.kind in "iu"


def _has_zero(x: Any) -> bool:
    if isinstance(x, ak.Array):
        return bool(ak.any(x == 0, axis=None))
    return bool(np.any(np.asarray(x) == 0))


def _float(x: Any) -> Any:
    if isinstance(x, ak.Array):
        return ak.values_astype(x, np.float64)
    return np.asarray(x, dtype=np.float64) if not isinstance(x, float) else x


_ELEMENTWISE: dict[str, tuple[Callable[..., Any], int]] = {
    **{name: (getattr(np, name), 1) for name in (
        "sqrt exp log log10 sin cos tan arcsin arccos arctan sinh cosh tanh "
        "floor ceil sign").split()},
    "isnan": (_nan_test(np.isnan), 1), "isfinite": (_nan_test(np.isfinite), 1),
    "abs": (np.absolute, 1),
    **{name: (getattr(np, name), 2) for name in ("arctan2", "hypot", "minimum", "maximum")},
    "where": (_where, 3),
    "bitwise_and": (_bitwise(np.bitwise_and, "bitwise_and"), 2),
    "bitwise_or": (_bitwise(np.bitwise_or, "bitwise_or"), 2),
}
# name -> (reducer, value for an empty list or None when that is the optional 2nd argument)
_REDUCTIONS: dict[str, tuple[Callable[[Any], Any], Any]] = {
    "sum": (lambda x: ak.sum(_numeric(x), axis=-1), 0),
    "count": (lambda x: ak.num(x, axis=-1), 0),
    "any": (lambda x: ak.any(x, axis=-1), False),
    "all": (lambda x: ak.all(x, axis=-1), True),
    "mean": (lambda x: ak.mean(_numeric(x), axis=-1), None),
    "max": (lambda x: ak.max(_numeric(x), axis=-1), None),
    "min": (lambda x: ak.min(_numeric(x), axis=-1), None),
}
ELEMENTWISE: frozenset[str] = frozenset(_ELEMENTWISE)
REDUCTIONS: frozenset[str] = frozenset(_REDUCTIONS)
FUNCTIONS: frozenset[str] = ELEMENTWISE | REDUCTIONS
_ARITY: dict[str, tuple[int, int]] = {
    **{name: (n, n) for name, (_, n) in _ELEMENTWISE.items()},
    **{name: (1, 1 if empty is not None else 2) for name, (_, empty) in _REDUCTIONS.items()},
}

_BINARY: dict[type, Callable[[Any, Any], Any]] = {
    **{op: _arithmetic(ufunc) for op, ufunc in (
        (ast.Add, np.add), (ast.Sub, np.subtract), (ast.Mult, np.multiply),
        (ast.Div, np.true_divide), (ast.Pow, np.float_power))},
    ast.FloorDiv: _dividing(np.floor_divide), ast.Mod: _dividing(np.mod),
    ast.BitAnd: np.logical_and, ast.BitOr: np.logical_or,
}
_UNARY: dict[type, Callable[[Any], Any]] = {
    ast.USub: lambda a: np.negative(_numeric(a)), ast.UAdd: lambda a: np.positive(_numeric(a)),
    ast.Invert: np.logical_not, ast.Not: np.logical_not,
}
_COMPARE: dict[type, Callable[[Any, Any], Any]] = {
    ast.Lt: np.less, ast.LtE: np.less_equal, ast.Gt: np.greater,
    ast.GtE: np.greater_equal, ast.Eq: np.equal, ast.NotEq: np.not_equal,
}
_BOOL: dict[type, Callable[[Any, Any], Any]] = {ast.And: np.logical_and, ast.Or: np.logical_or}
_OP_TEXT = {ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.Eq: "==", ast.NotEq: "!="}

_DISALLOWED: dict[type, str] = {
    ast.Attribute: "attribute access (a branch name with a dot cannot be named either)",
    ast.Slice: "a slice (one element is Jet_pt[0]; a range is not allowed)",
    ast.Lambda: "lambda", ast.ListComp: "a comprehension",
    ast.SetComp: "a comprehension", ast.DictComp: "a comprehension",
    ast.GeneratorExp: "a generator expression",
    ast.IfExp: "a conditional expression ('a if cond else b'; use where(cond, a, b))",
    ast.NamedExpr: "an assignment expression (':=')", ast.List: "a list literal",
    ast.Tuple: "a tuple", ast.Set: "a set literal", ast.Dict: "a dict literal",
    ast.Starred: "a starred argument", ast.JoinedStr: "an f-string", ast.Await: "await",
    ast.Yield: "yield", ast.YieldFrom: "yield", ast.BitXor: "operator '^' (use !=)",
    ast.LShift: "operator '<<'", ast.RShift: "operator '>>'", ast.MatMult: "operator '@'",
    ast.Is: "an 'is' comparison (use ==)", ast.IsNot: "an 'is not' comparison (use !=)",
    ast.In: "an 'in' membership test", ast.NotIn: "a 'not in' membership test",
    ast.keyword: "a keyword argument",
}
_LITERALS = {str: "a string literal", bytes: "a bytes literal", complex: "a complex number"}


def _primitive(x: ak.Array) -> str | None:
    kind = x.type.content
    while hasattr(kind, "content"):
        kind = kind.content
    return getattr(kind, "primitive", None)


def _is_jagged(x: Any) -> bool:
    return isinstance(x, (ak.Array, np.ndarray)) and x.ndim >= 2


def _listing(names: Iterable[str], limit: int = 20) -> str:
    """Long branch lists would drown the message; show the first few."""
    ordered = sorted(names)
    shown = ", ".join(ordered[:limit])
    more = len(ordered) - limit
    return shown + (f", ... ({more} more)" if more > 0 else "") if ordered else "(none)"


def _suggest(name: str, candidates: Iterable[str]) -> str:
    near = close_names(name, candidates)
    return f"did you mean {' or '.join(map(repr, near))}?" if near else ""


def unknown_names_message(unknown: Iterable[str], available: Iterable[str], source: str) -> str:
    """What is unknown in ``source``, the closest names to each, then the names that exist.

    Shared by :meth:`Expression.check_names`, evaluation and the data layer's
    check against a tree, so a misspelled name reads the same wherever it is caught.
    """
    pool = sorted(set(available))
    missing = sorted(unknown)
    if len(missing) == 1:
        hint = _suggest(missing[0], pool)
        head = f"unknown name {missing[0]!r} in expression {source!r};{' ' + hint if hint else ''}"
    else:
        parts = [f"{n!r}" + (f" ({hint})" if (hint := _suggest(n, pool)) else "") for n in missing]
        head = f"unknown names {', '.join(parts)} in expression {source!r};"
    return f"{head} available names: {_listing(pool)}"


class Expression:
    """A parsed expression: checked once against the spec, then evaluated on every chunk."""

    def __init__(self, source: str, run: Evaluator, names: Iterable[str],
                 functions: Iterable[str], field_path: str | None, strict: bool = True) -> None:
        self.source = source
        self.names = frozenset(names)
        self.functions = frozenset(functions)
        self.field_path = field_path
        self.strict = strict
        self._run = run

    def __repr__(self) -> str:
        return f"Expression({self.source!r})"

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        """Pickled as its source and compiled again: the evaluator is closures.

        DataLoader workers started by spawn or forkserver (macOS's and
        Windows' default) receive the dataset, and with it its expressions,
        pickled.
        """
        return _parsed, (self.source, self.field_path, self.strict)

    def evaluate(self, arrays: Mapping[str, Any]) -> Any:
        """One value per event (jagged stays jagged); NaN/inf are left for the data layer."""
        with np.errstate(all="ignore"):
            try:
                return self._run(arrays)
            except ExpressionError:
                raise
            except (ValueError, TypeError, OverflowError) as exc:
                raise ExpressionError(
                    f"cannot evaluate expression {self.source!r}: {_why(exc)}",
                    field_path=self.field_path) from exc

    def check_names(self, available: Iterable[str], *, field_path: str | None = None) -> None:
        """Fail at spec time, before any data is read, on a misspelled branch."""
        pool = set(available)
        unknown = self.names - pool
        if unknown:
            raise ExpressionError(unknown_names_message(unknown, pool, self.source),
                                  field_path=field_path or self.field_path)


def _why(exc: BaseException) -> str:
    """The cause in a physicist's words where awkward's are about its internals."""
    text = " ".join(str(exc).split())
    if "cannot broadcast nested list" in text:
        return ("it combines lists of different lengths element by element, as branches of "
                "two collections (Jet_pt + Muon_pt) have: reduce one of them first "
                "(max(Muon_pt, 0), sum(...)) or combine branches of one collection")
    return text.split(" This error occurred while calling")[0]


def _loose_logic(node: ast.expr) -> bool:
    """``a & b``, ``a | b`` or ``~a``: what Python binds tighter than a comparison."""
    return ((isinstance(node, ast.BinOp) and isinstance(node.op, (ast.BitAnd, ast.BitOr)))
            or (isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Invert)))


def _whole_number(node: ast.expr) -> int | None:
    """The value of ``3`` or ``-1`` written as a literal, else None."""
    sign = 1
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        node, sign = node.operand, -1
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return sign * node.value
    return None


def _parsed(source: str, field_path: str | None, strict: bool = True) -> Expression:
    return parse(source, field_path=field_path, strict=strict)


def is_identifier(source: str) -> bool:
    """A bare branch name can be read directly, without evaluating anything."""
    if not isinstance(source, str):
        return False
    text = source.strip()
    return bool(_NAME.fullmatch(text)) and not keyword.iskeyword(text)


def parse(source: str, *, field_path: str | None = None, strict: bool = True) -> Expression:
    """Validate once at spec time so that evaluation cannot fail on syntax mid-job.

    ``strict`` adds the refusals that guard a spec being written (a logic
    operator beside a comparison, ``&`` with a bit mask); ``False`` reads an
    expression an exported bundle was trained with, which passed the rules
    of its day and must mean what it meant then.
    """
    if not isinstance(source, str):
        raise ExpressionError(f"an expression must be a string, got {source!r}",
                              field_path=field_path)
    compiler = _Compiler(source, field_path, strict)
    try:
        run = compiler.compile(compiler.tree())
    except (RecursionError, MemoryError):  # the parser reports deep nesting as MemoryError
        raise compiler.error(f"expression {source!r} is nested too deeply") from None
    return Expression(source, run, compiler.names, compiler.functions, field_path, strict)


class _Compiler:
    """Turns the whitelisted AST into nested closures; anything not whitelisted is an error."""

    def __init__(self, source: str, field_path: str | None, strict: bool = True) -> None:
        self.source = source
        self.field_path = field_path
        self.strict = strict
        self.indent = len(source) - len(source.lstrip())
        self.names: set[str] = set()
        self.functions: set[str] = set()

    def error(self, message: str) -> ExpressionError:
        return ExpressionError(message, field_path=self.field_path)

    def tree(self) -> ast.expr:
        text = self.source.strip()
        try:
            with AST_LOCK:
                return ast.parse(text, mode="eval").body
        except SyntaxError as exc:
            line, column = exc.lineno or 1, (exc.offset or 1) - 1
            first = self.source.partition("\n")[0]
            if not exc.offset and line == 1:  # Python's way of saying: it ended too early
                column = len(first.rstrip()) - self.indent
                if exc.msg == "invalid syntax":
                    exc.msg = "the expression ends too early"
            caret = f"\n  {first}\n  {' ' * (column + self.indent)}^" if line == 1 else ""
            raise self.error(f"invalid syntax in expression {self.source!r} at "
                             f"{self.position(line, column)}: {exc.msg}{caret}") from None

    def position(self, line: int, column: int) -> str:
        """1-based column in the original text (parsing drops leading blanks)."""
        if line > 1:
            return f"line {line}, column {column + 1}"
        return f"column {column + 1 + self.indent}"

    def text(self, node: ast.AST) -> str:
        return ast.get_source_segment(self.source.strip(), node) or type(node).__name__

    def not_allowed(self, node: ast.AST, what: str | None = None) -> ExpressionError:
        what = what or _DISALLOWED.get(type(node), f"{type(node).__name__} syntax")
        where = self.position(getattr(node, "lineno", 1), getattr(node, "col_offset", 0))
        return self.error(f"{what} is not allowed: {self.text(node)!r} at {where} "
                          f"in expression {self.source!r}")

    def compile(self, node: ast.AST) -> Evaluator:
        handler = getattr(self, f"_{type(node).__name__}", None)
        if handler is None:
            raise self.not_allowed(node)
        return handler(node)

    def _Constant(self, node: ast.Constant) -> Evaluator:
        value = node.value
        if not isinstance(value, (bool, int, float)):
            raise self.not_allowed(node, _LITERALS.get(type(value), f"the constant {value!r}"))
        return lambda arrays: value

    def _Name(self, node: ast.Name) -> Evaluator:
        name = node.id
        if not _NAME.fullmatch(name):
            raise self.not_allowed(node, "a name with characters other than [A-Za-z0-9_]")
        self.names.add(name)

        def lookup(arrays: Mapping[str, Any]) -> Any:
            try:
                return arrays[name]
            except (KeyError, IndexError):  # an awkward record array raises IndexError
                keys = arrays.fields if isinstance(arrays, ak.Array) else arrays.keys()
                raise self.error(unknown_names_message([name], keys, self.source)) from None
        return lookup

    def _BinOp(self, node: ast.BinOp) -> Evaluator:
        op = self.operator(node.op, _BINARY, node)
        if self.strict and isinstance(node.op, (ast.BitAnd, ast.BitOr)):
            self.check_bit_mask(node)
        left, right = self.compile(node.left), self.compile(node.right)
        return lambda arrays: op(left(arrays), right(arrays))

    def _UnaryOp(self, node: ast.UnaryOp) -> Evaluator:
        op = self.operator(node.op, _UNARY, node)
        operand = self.compile(node.operand)
        return lambda arrays: op(operand(arrays))

    def _BoolOp(self, node: ast.BoolOp) -> Evaluator:
        op = self.operator(node.op, _BOOL, node)
        values = [self.compile(v) for v in node.values]
        return lambda arrays: functools.reduce(op, [v(arrays) for v in values])

    def _Compare(self, node: ast.Compare) -> Evaluator:
        ops = [self.operator(op, _COMPARE, node) for op in node.ops]
        for operand in [node.left, *node.comparators]:
            if self.strict:
                self.check_precedence(node, operand)
        operands = [self.compile(v) for v in [node.left, *node.comparators]]

        def compare(arrays: Mapping[str, Any]) -> Any:
            values = [v(arrays) for v in operands]
            pairs = [op(a, b) for op, a, b in zip(ops, values, values[1:])]
            return functools.reduce(np.logical_and, pairs)
        return compare

    def check_precedence(self, compare: ast.Compare, operand: ast.expr) -> None:
        """Refuse ``a > 1 & b < 2``: Python reads it as ``a > (1 & b) < 2``, silently.

        ROOT's ``&&``, pandas' query and SQL's AND all bind looser than a
        comparison, so a physicist's cut written that way selected other
        events without a word. Only an unparenthesised ``&``, ``|`` or ``~``
        directly beside a comparison operator is refused; with its own
        parentheses it means what it says (``f > (1 & n)``).
        """
        if not _loose_logic(operand) or self.parenthesised(operand):
            return
        symbol = {ast.BitAnd: "&", ast.BitOr: "|", ast.Invert: "~"}[type(operand.op)]
        raise self.error(
            f"{symbol!r} binds tighter than a comparison: in expression {self.source!r}, "
            f"{self.text(operand)!r} is one side of {self.text(compare)!r}; "
            f"{self.regrouped(compare, operand)}, or use 'and' / 'or' / 'not', which bind "
            "looser than comparisons")

    def regrouped(self, compare: ast.Compare, operand: ast.BinOp | ast.UnaryOp) -> str:
        """The comparison with ``&``, ``|`` or ``~`` binding looser, as ROOT's ``&&`` does.

        Only where that reading is plain: one logic operator among the
        comparison's operands, its sides free of more logic. Otherwise the
        advice is general (a rewrite that kept a trap inside would mislead).
        """
        items = [compare.left, *compare.comparators]
        ops = [_OP_TEXT[type(op)] for op in compare.ops]
        logic = [item for item in items if _loose_logic(item) and not self.parenthesised(item)]
        general = "put parentheses around each comparison"
        if len(logic) != 1:
            return general
        i = items.index(operand)
        if isinstance(operand, ast.UnaryOp):  # ~a > 1: C++ and Python read (~a) > 1 too
            if i or len(ops) != 1:
                return general
            rest = self.atom(items[1])
            return (f"write ~({self.atom(operand.operand)} {ops[0]} {rest}) or "
                    f"(~{self.atom(operand.operand)}) {ops[0]} {rest}, whichever you mean")
        if any(_loose_logic(side) and not self.parenthesised(side)
               for side in (operand.left, operand.right)):
            return general
        symbol = "&" if isinstance(operand.op, ast.BitAnd) else "|"
        left = self.chain([*items[:i], operand.left], ops[:i])
        right = self.chain([operand.right, *items[i + 1:]], ops[i:])
        return f"write {left} {symbol} {right} if that is what you mean"

    def check_bit_mask(self, node: ast.BinOp) -> None:
        """Refuse ``Jet_jetId & 4``: logical here (true for any non-zero id), a bit test in C++."""
        for side, other in ((node.right, node.left), (node.left, node.right)):
            inverted = isinstance(side, ast.UnaryOp) and isinstance(side.op, ast.Invert)
            value = _whole_number(side.operand if inverted else side)
            if value is None or value in (0, 1):
                continue
            symbol = "&" if isinstance(node.op, ast.BitAnd) else "|"
            func = "bitwise_and" if symbol == "&" else "bitwise_or"
            advice = (f"{func}(...) with the mask written as a number (~ is a logical not "
                      "here too)" if inverted else
                      f"{func}({self.text(other)}, {self.text(side)}) > 0")
            raise self.error(
                f"{symbol!r} is a logical {'and' if symbol == '&' else 'or'} in mlaas "
                f"expressions, so {self.text(node)!r} in expression {self.source!r} does not "
                f"test bits ({self.text(side)} counts as true); for a bit test write {advice}")

    def chain(self, items: list[ast.expr], ops: list[str]) -> str:
        """``a < b < c`` from its parts, in parentheses when it compares anything."""
        parts = [self.atom(items[0])]
        for op, item in zip(ops, items[1:], strict=True):
            parts += [op, self.atom(item)]
        return f"({' '.join(parts)})" if ops else parts[0]

    def atom(self, node: ast.expr) -> str:
        """``node``'s text, in parentheses when it binds looser than arithmetic."""
        loose = (isinstance(node, (ast.Compare, ast.BoolOp)) or _loose_logic(node)
                 or (isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not)))
        return f"({self.text(node)})" if loose else self.text(node)

    def parenthesised(self, node: ast.expr) -> bool:
        """Whether ``node`` has parentheses of its own (``ast`` keeps none: read the text)."""
        text = self.source.strip().encode()
        starts = [0] + [m.end() for m in re.finditer(rb"\r\n|\r|\n", text)]  # as ast counts lines
        start = starts[node.lineno - 1] + node.col_offset
        end = starts[(node.end_lineno or 1) - 1] + (node.end_col_offset or 0)
        before, after = text[:start].rstrip(), text[end:].lstrip()
        return before.endswith(b"(") and after.startswith(b")")

    def operator(self, op: ast.AST, table: dict[type, Any], node: ast.AST) -> Any:
        if type(op) not in table:
            raise self.not_allowed(node, _DISALLOWED.get(type(op), type(op).__name__))
        return table[type(op)]

    def _Subscript(self, node: ast.Subscript) -> Evaluator:
        """``Jet_pt[0]``: the leading object's value, missing for an event with too few.

        Only a whole-number literal: what ``max(Jet_pt, 0)`` cannot say (the
        second jet, the last muon) without handing users general indexing.
        Missing, not an error, for a short list: as a feature, label or weight
        it becomes NaN (pass 1 counts those; ``data.nan`` or a cut such as
        ``count(Jet_pt) >= 2`` deals with them), and a cut never selects it.
        """
        index = _whole_number(node.slice)
        if index is None:
            raise self.not_allowed(node, "a subscript other than a whole number, as in "
                                   "Jet_pt[0] or Jet_pt[-1],")
        value, text = self.compile(node.value), self.text(node.value)

        def element(arrays: Mapping[str, Any]) -> Any:
            x = value(arrays)
            if not _is_jagged(x) or x.ndim != 2:
                raise self.error(f"{text}[{index}] needs a jagged collection (a list per "
                                 f"event) but {text!r} is not one in expression {self.source!r}")
            x = ak.Array(x) if not isinstance(x, ak.Array) else x
            i = index
            if i < 0:  # from the end: the same position of the reversed list
                x, i = x[:, ::-1], -i - 1
            # missing (None), not NaN: an integer stays an integer (bitwise_and of an id),
            # a comparison of a missing value is missing, and a cut does not select it
            return ak.pad_none(x, i + 1, axis=1)[:, i]
        return element

    def _Call(self, node: ast.Call) -> Evaluator:
        if isinstance(node.func, ast.Attribute):  # np.max(x): a method, not a branch name
            raise self.not_allowed(node.func, "attribute access")
        if not isinstance(node.func, ast.Name):
            raise self.not_allowed(node, "calling anything but a function name")
        if node.keywords:
            raise self.not_allowed(node.keywords[0])
        for arg in node.args:
            if isinstance(arg, ast.Starred):
                raise self.not_allowed(arg)
        name = node.func.id
        if name not in FUNCTIONS:
            hint = _suggest(name, FUNCTIONS)
            raise self.error(f"unknown function {name!r} in expression {self.source!r};"
                             f"{' ' + hint if hint else ''} available functions: "
                             f"{', '.join(sorted(FUNCTIONS))}")
        self.check_arity(name, node)
        self.functions.add(name)
        args = [self.compile(a) for a in node.args]
        if name in _ELEMENTWISE:
            func = _ELEMENTWISE[name][0]
            return lambda arrays: func(*(a(arrays) for a in args))
        return self.reduction(name, args, self.text(node.args[0]))

    def check_arity(self, name: str, node: ast.Call) -> None:
        low, high = _ARITY[name]
        got = len(node.args)
        if not low <= got <= high:
            want = str(low) if low == high else f"{low} or {high}"
            plural = "" if want == "1" else "s"
            raise self.error(f"function {name!r} takes {want} argument{plural}, got {got} "
                             f"in expression {self.source!r}")

    def reduction(self, name: str, args: list[Evaluator], arg_text: str) -> Evaluator:
        reducer, empty = _REDUCTIONS[name]

        def reduce(arrays: Mapping[str, Any]) -> Any:
            x = args[0](arrays)
            if not _is_jagged(x):
                raise self.error(
                    f"{name}() needs a jagged collection (a list per event) but {arg_text!r} "
                    f"is flat (one value per event) in expression {self.source!r}")
            if empty is not None:
                return ak.fill_none(reducer(x), empty)
            default = args[1](arrays) if len(args) > 1 else np.nan
            is_empty = ak.fill_none(ak.num(x, axis=-1) == 0, True)
            return ak.fill_none(ak.where(is_empty, default, reducer(x)), 0)
        return reduce
