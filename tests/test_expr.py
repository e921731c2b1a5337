"""Tests for mlaas.expr: every operator, function and error, checked against numpy/awkward."""

from __future__ import annotations

import math
from pathlib import Path

import awkward as ak
import numpy as np
import pytest

from mlaas.errors import ExpressionError
from mlaas.expr import ELEMENTWISE, FUNCTIONS, REDUCTIONS, Expression, is_identifier, parse

HZZ = Path(__file__).parent / "files" / "uproot-HZZ.root"

# Three events: two values, an empty list, one value.
JAGGED = [[1.5, -2.0], [], [4.0]]
FLAT = [2.0, 0.0, -3.0]


@pytest.fixture
def arrays() -> dict[str, object]:
    return {
        "j": ak.Array(JAGGED),
        "ji": ak.Array([[3, 1], [], [-2]]),
        "jb": ak.Array([[True, False], [], [False]]),
        "f": np.array(FLAT),
        "a": ak.Array(FLAT),
        "n": np.array([2, 0, 1]),
        "t": np.array([True, False, True]),
    }


@pytest.fixture(scope="module")
def hzz() -> dict[str, ak.Array]:
    uproot = pytest.importorskip("uproot")
    branches = ["Jet_Px", "Jet_Py", "Jet_ID", "Muon_Charge", "MET_px", "MET_py", "triggerIsoMu24"]
    events = uproot.open(HZZ)["events"].arrays(branches)
    return {name: events[name] for name in branches}


def as_list(value: object) -> list:
    return ak.to_list(value) if isinstance(value, ak.Array) else np.asarray(value).tolist()


def assert_close(actual: object, expected: list) -> None:
    """Compare nested lists elementwise, treating NaN == NaN."""
    got = as_list(actual)
    assert len(got) == len(expected), (got, expected)
    for g, e in zip(got, expected):
        if isinstance(e, list):
            assert_close(g, e)
        elif isinstance(e, float) and math.isnan(e):
            assert isinstance(g, float) and math.isnan(g), (got, expected)
        else:
            assert g == pytest.approx(e), (got, expected)


def per_event(func, *columns: list) -> list:
    """Reference computation: plain Python over each event (tests only)."""
    return [func(*values) for values in zip(*columns)]


# --- arithmetic, comparison, logic -----------------------------------------------------------

BINARY = {
    "+": lambda x, y: x + y,
    "-": lambda x, y: x - y,
    "*": lambda x, y: x * y,
    "/": lambda x, y: x / y,
    "//": lambda x, y: x // y,
    "%": lambda x, y: x % y,
    "**": lambda x, y: x**y if x >= 0 or float(y).is_integer() else math.nan,
    "<": lambda x, y: x < y,
    "<=": lambda x, y: x <= y,
    ">": lambda x, y: x > y,
    ">=": lambda x, y: x >= y,
    "==": lambda x, y: x == y,
    "!=": lambda x, y: x != y,
}


@pytest.mark.parametrize("op", sorted(BINARY))
def test_binary_operator_on_flat_arrays(arrays, op):
    result = parse(f"f {op} 1.5").evaluate(arrays)
    assert_close(result, [BINARY[op](x, 1.5) for x in FLAT])


@pytest.mark.parametrize("op", sorted(BINARY))
def test_binary_operator_broadcasts_flat_into_jagged(arrays, op):
    result = parse(f"j {op} a").evaluate(arrays)
    expected = per_event(lambda xs, y: [BINARY[op](x, y) for x in xs], JAGGED, FLAT)
    assert_close(result, expected)
    assert isinstance(result, ak.Array) and result.ndim == 2


def test_mixed_int_float_arithmetic_is_float64(arrays):
    result = parse("n * 1.5 + ji").evaluate(arrays)
    assert str(ak.type(result)).endswith("float64")
    assert_close(result, [[6.0, 4.0], [], [-0.5]])


def test_division_by_zero_gives_inf_and_nan_without_warning(arrays):
    assert_close(parse("f / 0").evaluate(arrays), [math.inf, math.nan, -math.inf])
    assert_close(parse("log(f)").evaluate(arrays), [math.log(2.0), -math.inf, math.nan])


def test_integer_floor_division_and_modulo_by_zero_give_inf_and_nan(arrays):
    # numpy's integer // and % give 0 for a division by zero, silently
    m = {"k": np.array([4, 0, 3]), "z": np.array([0, 0, 2]), "jk": ak.Array([[4, 0], [], [3]])}
    assert_close(parse("k // z").evaluate(m), [math.inf, math.nan, 1.0])
    assert_close(parse("k % z").evaluate(m), [math.nan, math.nan, 1.0])
    assert_close(parse("jk // 0").evaluate(m), [[math.inf, math.nan], [], [math.inf]])
    assert list(parse("k // 2").evaluate(m)) == [2, 0, 1]  # no zero divisor: integers
    assert parse("-7 % 3").evaluate({}) == 2.0  # Python's sign rules, as numpy's


def test_integer_floor_division_and_modulo_are_exact_without_a_zero_divisor():
    # 64-bit bitmasks and event numbers beyond 2**53 decode exactly (a float64 path did not)
    bits = np.array([2**60 + 9, 2**63 + 5, 2**40 + 8], dtype=np.uint64)
    ev = np.array([2**53 + 1, 123456789012345678], dtype=np.int64)
    m = {"bits": bits, "ev": ev}
    assert list(parse("bits % 2").evaluate(m)) == [1, 1, 0]
    assert list(parse("(bits // 8) % 2").evaluate(m)) == [1, 0, 1]
    assert list(parse("bits // 2**62").evaluate(m)) == [0, 2, 0]  # 2**63 + 5 stays positive
    assert list(parse("ev % 10").evaluate(m)) == [3, 8]


def test_narrow_integers_do_not_wrap_around():
    m = {"i8": np.array([100, -100], dtype=np.int8), "i16": np.array([30000], dtype=np.int16)}
    assert list(parse("i8 + 100").evaluate(m)) == [200, 0]
    assert list(parse("i16 * 2").evaluate(m)) == [60000]


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32, np.uint64])
def test_unsigned_integers_are_signed_in_arithmetic(dtype):
    # NanoAOD's counters, ids and run/lumi/event are unsigned: nJet - nMuon must not wrap
    m = {"u": np.array([1, 60], dtype), "v": np.array([3, 2], dtype),
         "ju": ak.values_astype(ak.Array([[1, 3], []]), dtype)}
    assert_close(parse("u - v").evaluate(m), [-2, 58])
    assert_close(parse("u - 50").evaluate(m), [-49, 10])
    assert_close(parse("-u").evaluate(m), [-1, -60])
    assert_close(parse("ju - 2").evaluate(m), [[-1, 1], []])
    assert_close(parse("sum(ju - 2)").evaluate(m), [0, 0])
    assert list(parse("u - 50 < 0").evaluate(m)) == [True, False]


def test_power_with_negative_integer_exponent(arrays):
    assert_close(parse("n ** -1").evaluate(arrays), [0.5, math.inf, 1.0])


def test_unary_minus_and_plus(arrays):
    assert_close(parse("-j").evaluate(arrays), [[-1.5, 2.0], [], [-4.0]])
    assert_close(parse("+f").evaluate(arrays), FLAT)
    assert_close(parse("--f").evaluate(arrays), FLAT)


def test_booleans_count_as_integers_in_arithmetic(arrays):
    assert_close(parse("t + t").evaluate(arrays), [2, 0, 2])
    assert_close(parse("jb + jb").evaluate(arrays), [[2, 0], [], [0]])
    assert_close(parse("-t").evaluate(arrays), [-1, 0, -1])
    assert parse("True + True").evaluate({}) == 2


def test_chained_comparison_means_and_of_pairs(arrays):
    result = parse("-1 < f <= 2").evaluate(arrays)
    assert as_list(result) == [True, True, False]
    jagged = parse("0 < j < a + 3").evaluate(arrays)
    assert as_list(jagged) == [[True, False], [], [False]]


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("(f > 0) & t", [True, False, False]),
        ("(f > 0) | t", [True, False, True]),
        ("~t", [False, True, False]),
        ("(f > 0) and t", [True, False, False]),
        ("(f > 0) or t", [True, False, True]),
        ("not t", [False, True, False]),
        ("t and (f < 5) and (n > 0)", [True, False, True]),
        ("not (f > 0) or not t", [False, True, True]),
    ],
)
def test_logic_operators_are_elementwise(arrays, source, expected):
    assert as_list(parse(source).evaluate(arrays)) == expected


def test_logic_on_jagged_booleans(arrays):
    assert as_list(parse("~jb").evaluate(arrays)) == [[False, True], [], [True]]
    assert as_list(parse("jb | (j > 3)").evaluate(arrays)) == [[True, False], [], [True]]
    assert as_list(parse("not jb").evaluate(arrays)) == [[False, True], [], [True]]


def test_logic_treats_numbers_as_truth_values_and_bits_have_functions(arrays):
    # logical, as trained models' expressions meant: 2 & 1 would be 0 bitwise, ~0 -1
    assert as_list(parse("n & 1").evaluate(arrays)) == [True, False, True]
    assert as_list(parse("n | 0").evaluate(arrays)) == [True, False, True]
    assert as_list(parse("~n").evaluate(arrays)) == [False, True, False]
    assert as_list(parse("n and t").evaluate(arrays)) == [True, False, True]
    # bits: NanoAOD packs ids and flags into them (Jet_jetId bit 2: tight)
    assert as_list(parse("bitwise_and(n, 1)").evaluate(arrays)) == [0, 0, 1]
    assert as_list(parse("bitwise_or(n, 4)").evaluate(arrays)) == [6, 4, 5]
    assert as_list(parse("sum(bitwise_and(ji, 2) > 0)").evaluate(arrays)) == [1, 0, 1]
    ids = np.array([0, 2, 4, 6, 7], dtype=np.uint8)
    assert as_list(parse("bitwise_and(id, 4) > 0").evaluate({"id": ids})) == [
        False, False, True, True, True]
    with pytest.raises(ExpressionError, match=r"bitwise_and\(\) takes integers"):
        parse("bitwise_and(f, 4)").evaluate(arrays)


@pytest.mark.parametrize("text, advice", [
    ("Jet_jetId & 4", "write bitwise_and(Jet_jetId, 4) > 0"),
    ("(Jet_jetId & 4) > 0", "write bitwise_and(Jet_jetId, 4) > 0"),
    ("2 | flags", "write bitwise_or(flags, 2) > 0"),
    ("flags & ~4", "with the mask written as a number"),
])
def test_logic_with_a_bit_mask_is_refused_pointing_at_the_bit_functions(text, advice):
    # '&' is logical here: Jet_jetId & 4 is true for any non-zero id, a bit test in C++
    with pytest.raises(ExpressionError) as info:
        parse(text, field_path="data.cut")
    assert "does not test bits" in str(info.value) and advice in str(info.value)
    parse(text, strict=False)  # what an exported bundle was trained with still reads


@pytest.mark.parametrize("text, meant", [
    ("f > 1 & n < 2", "write (f > 1) & (n < 2) if that is what you mean"),
    ("nJet > 9 & (MET_pt < 0.5)", "write (nJet > 9) & (MET_pt < 0.5) if that is what you mean"),
    ("a & b > 1", "write a & (b > 1) if that is what you mean"),
    ("(a) | (b) == 1", "write a | (b == 1) if that is what you mean"),
    ("x + 1 > 2 | abs(y) < 3", "write (x + 1 > 2) | (abs(y) < 3) if that is what you mean"),
    ("~t == 1", "write ~(t == 1) or (~t) == 1, whichever you mean"),
    ("where(a & b > 1, 1, 2)", "write a & (b > 1) if that is what you mean"),
    # no one plain reading: the advice is general, never a rewrite that keeps a trap
    ("a > 1 & b < 2 & c", "put parentheses around each comparison"),
    ("a & b > 1 | c", "put parentheses around each comparison"),
    ("a < b < ~c", "put parentheses around each comparison"),
])
def test_logic_beside_a_comparison_without_parentheses_is_refused(text, meant):
    # Python reads a > 1 & b < 2 as a > (1 & b) < 2: a cut that silently selected other events
    with pytest.raises(ExpressionError) as info:
        parse(text, field_path="data.cut")
    message = str(info.value)
    assert "binds tighter than a comparison" in message
    assert meant in message
    assert "at spec field data.cut" in message
    parse(text, strict=False)  # a bundle's expression means what it meant when trained


def test_parentheses_are_found_across_any_line_break_python_knows():
    for brk in ("\n", "\r\n", "\r"):
        parse(f"(a{brk}& b) > 1")
        with pytest.raises(ExpressionError, match="binds tighter"):
            parse(f"where(a{brk}& b > 1, 1, 0)")


def test_logic_with_its_own_parentheses_means_what_it_says(arrays):
    assert as_list(parse("(f > 1) & (n < 2)").evaluate(arrays)) == [False, False, False]
    assert as_list(parse("f > (1 & n)").evaluate(arrays)) == as_list(
        parse("f > x").evaluate({**arrays, "x": np.array([True, False, True])}))
    assert as_list(parse("f > 1 and n < 2").evaluate(arrays)) == [False, False, False]
    parse("(a > 1) & (b < 2) | ~c")  # no comparison beside the logic: nothing to refuse


def test_literals(arrays):
    assert parse("2 * 3").evaluate({}) == 6
    assert parse("1e3 / 4").evaluate({}) == 250.0
    assert bool(parse("True & False").evaluate({})) is False
    assert as_list(parse("f * 0 + 7").evaluate(arrays)) == [7.0, 7.0, 7.0]


def test_scalar_expression_returns_scalar():
    assert np.ndim(parse("sqrt(16) + 1").evaluate({"x": np.arange(3)})) == 0


# --- elementwise functions -------------------------------------------------------------------

UNARY_FUNCTIONS = {
    "abs": abs, "sqrt": math.sqrt, "exp": math.exp, "log": math.log, "log10": math.log10,
    "sin": math.sin, "cos": math.cos, "tan": math.tan, "arcsin": math.asin,
    "arccos": math.acos, "arctan": math.atan, "sinh": math.sinh, "cosh": math.cosh,
    "tanh": math.tanh, "floor": math.floor, "ceil": math.ceil,
    "sign": lambda x: (x > 0) - (x < 0), "isnan": math.isnan, "isfinite": math.isfinite,
}
UNARY_INPUT = [[0.25, 0.5], [], [0.75]]


def test_every_function_is_tested():
    tested = set(UNARY_FUNCTIONS) | {"arctan2", "hypot", "minimum", "maximum", "where",
                                     "bitwise_and", "bitwise_or"}  # see the logic tests
    assert tested == set(ELEMENTWISE)
    assert set(REDUCTIONS) == {"sum", "max", "min", "mean", "count", "any", "all"}
    assert FUNCTIONS == ELEMENTWISE | REDUCTIONS


@pytest.mark.parametrize("name", sorted(UNARY_FUNCTIONS))
def test_unary_function_on_jagged(name):
    result = parse(f"{name}(x)").evaluate({"x": ak.Array(UNARY_INPUT)})
    expected = [[UNARY_FUNCTIONS[name](v) for v in event] for event in UNARY_INPUT]
    assert_close(result, expected)


@pytest.mark.parametrize("name", sorted(UNARY_FUNCTIONS))
def test_unary_function_on_numpy_stays_numpy(name):
    result = parse(f"{name}(x)").evaluate({"x": np.array([0.25, 0.5])})
    assert isinstance(result, np.ndarray)
    assert_close(result, [UNARY_FUNCTIONS[name](v) for v in (0.25, 0.5)])


def test_abs_on_negative_values(arrays):
    assert_close(parse("abs(j)").evaluate(arrays), [[1.5, 2.0], [], [4.0]])


@pytest.mark.parametrize(
    ("name", "func"),
    [("arctan2", math.atan2), ("hypot", math.hypot), ("minimum", min), ("maximum", max)],
)
def test_two_argument_function(arrays, name, func):
    flat = parse(f"{name}(f, 1.0)").evaluate(arrays)
    assert_close(flat, [func(x, 1.0) for x in FLAT])
    jagged = parse(f"{name}(j, a)").evaluate(arrays)
    assert_close(jagged, per_event(lambda xs, y: [func(x, y) for x in xs], JAGGED, FLAT))


def test_arctan2_argument_order_is_y_then_x():
    assert parse("arctan2(1, 0)").evaluate({}) == pytest.approx(math.pi / 2)


def test_where_on_numpy_returns_numpy(arrays):
    result = parse("where(f > 0, f, -1)").evaluate(arrays)
    assert isinstance(result, np.ndarray)
    assert result.tolist() == [2.0, -1.0, -1.0]


def test_where_broadcasts_flat_condition_into_lists(arrays):
    result = parse("where(f > 0, j, -1)").evaluate(arrays)
    assert as_list(result) == [[1.5, -2.0], [], [-1.0]]
    assert result.ndim == 2


def test_where_with_jagged_condition(arrays):
    assert as_list(parse("where(j > 0, j, 0)").evaluate(arrays)) == [[1.5, 0.0], [], [4.0]]


def test_where_with_scalar_condition(arrays):
    assert as_list(parse("where(True, j, 0)").evaluate(arrays)) == JAGGED
    assert parse("where(1 > 2, 5, 6)").evaluate({}) == 6


def test_where_of_reduction_from_spec_example():
    data = {"nMuon": np.array([2, 0, 1]), "Muon_pt": ak.Array([[10.0, 30.0], [], [5.0]])}
    result = parse("where(nMuon > 0, max(Muon_pt, 0), -1)").evaluate(data)
    assert as_list(result) == [30.0, -1.0, 5.0]


# --- reductions ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("sum(j)", [-0.5, 0.0, 4.0]),
        ("sum(ji)", [4, 0, -2]),
        ("count(j)", [2, 0, 1]),
        ("any(jb)", [True, False, False]),
        ("all(jb)", [False, True, False]),
        ("mean(j)", [-0.25, math.nan, 4.0]),
        ("max(j)", [1.5, math.nan, 4.0]),
        ("min(j)", [-2.0, math.nan, 4.0]),
        ("max(j, 0)", [1.5, 0.0, 4.0]),
        ("min(j, -99)", [-2.0, -99.0, 4.0]),
        ("mean(j, 7)", [-0.25, 7.0, 4.0]),
        ("max(ji, 0)", [3, 0, -2]),
        ("min(ji)", [1.0, math.nan, -2.0]),
        ("max(j, f)", [1.5, 0.0, 4.0]),
        ("any(j > 3)", [False, False, True]),
        ("all(j > -3)", [True, True, True]),
    ],
)
def test_reduction_gives_one_plain_value_per_event(arrays, source, expected):
    result = parse(source).evaluate(arrays)
    assert_close(result, expected)
    assert result.ndim == 1
    assert "?" not in str(ak.type(result)), "option type leaked out of a reduction"


def test_count_counts_elements_not_true_values(arrays):
    assert as_list(parse("count(j > 0)").evaluate(arrays)) == [2, 0, 1]
    assert as_list(parse("sum(j > 0)").evaluate(arrays)) == [1, 0, 1]


def test_reduction_of_jagged_arithmetic(arrays):
    result = parse("sum(j * a) / count(j)").evaluate(arrays)
    assert_close(result, [-0.5, math.nan, -12.0])


@pytest.mark.parametrize("name", sorted(REDUCTIONS))
def test_reduction_on_flat_data_is_an_error(arrays, name):
    with pytest.raises(ExpressionError) as info:
        parse(f"{name}(f + 1)", field_path="data.cut").evaluate(arrays)
    message = str(info.value)
    assert "jagged" in message and "'f + 1'" in message and "data.cut" in message


# --- the real HZZ file -----------------------------------------------------------------------


def test_hzz_jagged_minus_flat(hzz):
    result = parse("Jet_Px - MET_px").evaluate(hzz)
    counts = ak.to_numpy(ak.num(hzz["Jet_Px"]))
    met_per_jet = np.repeat(ak.to_numpy(hzz["MET_px"]), counts)
    expected = ak.to_numpy(ak.flatten(hzz["Jet_Px"])) - met_per_jet
    assert ak.to_numpy(ak.num(result)).tolist() == counts.tolist()
    np.testing.assert_allclose(ak.to_numpy(ak.flatten(result)), expected)


def test_hzz_met_magnitude(hzz):
    result = parse("sqrt(MET_px**2 + MET_py**2)").evaluate(hzz)
    expected = np.hypot(ak.to_numpy(hzz["MET_px"]), ak.to_numpy(hzz["MET_py"]))
    np.testing.assert_allclose(ak.to_numpy(result), expected, rtol=1e-6)


def test_hzz_jet_pt_reductions(hzz):
    pts = [[math.hypot(x, y) for x, y in zip(xs, ys)]
           for xs, ys in zip(ak.to_list(hzz["Jet_Px"]), ak.to_list(hzz["Jet_Py"]))]
    leading = parse("max(hypot(Jet_Px, Jet_Py), 0)").evaluate(hzz)
    np.testing.assert_allclose(ak.to_numpy(leading), [max(p, default=0) for p in pts], rtol=1e-5)
    total = parse("sum(sqrt(Jet_Px**2 + Jet_Py**2))").evaluate(hzz)
    np.testing.assert_allclose(ak.to_numpy(total), [sum(p) for p in pts], rtol=1e-5)
    assert any(len(p) == 0 for p in pts), "the file should contain events without jets"


def test_hzz_cut_with_bool_and_int_branches(hzz):
    source = "triggerIsoMu24 & (count(Jet_Px) >= 2) & (sum(Jet_ID) >= 1)"
    result = parse(source).evaluate(hzz)
    expected = [bool(t and len(ids) >= 2 and sum(ids) >= 1) for t, ids in
                zip(ak.to_list(hzz["triggerIsoMu24"]), ak.to_list(hzz["Jet_ID"]))]
    assert as_list(result) == expected
    assert 0 < sum(expected) < len(expected)


def test_hzz_muon_charge_reductions(hzz):
    charges = ak.to_list(hzz["Muon_Charge"])
    assert as_list(parse("sum(Muon_Charge)").evaluate(hzz)) == [sum(c) for c in charges]
    lowest = parse("min(Muon_Charge, 0)").evaluate(hzz)
    assert as_list(lowest) == [min(c, default=0) for c in charges]
    positive = parse("all(Muon_Charge > 0)").evaluate(hzz)
    assert as_list(positive) == [all(v > 0 for v in c) for c in charges]


def test_hzz_awkward_record_array_works_as_mapping():
    uproot = pytest.importorskip("uproot")
    events = uproot.open(HZZ)["events"].arrays(["MET_px", "NJet"], entry_stop=10)
    result = parse("MET_px * NJet").evaluate(events)
    assert as_list(result) == pytest.approx((events["MET_px"] * events["NJet"]).tolist())
    with pytest.raises(ExpressionError, match="'MET_py'.*did you mean 'MET_px'"):
        parse("MET_py").evaluate(events)


# --- parse-time errors -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "construct"),
    [
        ("x.y", "attribute access"),
        ("np.sqrt(x)", "attribute access"),
        ("x[1:3]", "subscript other than a whole number"),
        ("x[y]", "subscript other than a whole number"),
        ("x[0.5]", "subscript other than a whole number"),
        ("'a'", "string literal"),
        ("b'a'", "bytes literal"),
        ("None", "None"),
        ("1j", "complex number"),
        ("lambda: 1", "lambda"),
        ("sqrt(x=1)", "keyword argument"),
        ("f(x=1)", "keyword argument"),
        ("sum(*x)", "starred argument"),
        ("x if y else z", "conditional expression"),
        ("[a for a in b]", "comprehension"),
        ("(a for a in b)", "generator expression"),
        ("(y := 1)", "assignment expression"),
        ("[1, 2]", "list literal"),
        ("(1, 2)", "tuple"),
        ("{1: 2}", "dict literal"),
        ("{1}", "set literal"),
        ("f'{x}'", "f-string"),
        ("x ^ y", "'^'"),
        ("x << 1", "'<<'"),
        ("x @ y", "'@'"),
        ("x is y", "'is'"),
        ("x in y", "'in'"),
        ("(x)(1)[0]", "unknown function 'x'"),
        ("(x + 1)(2)", "calling"),
        ("().__class__", "attribute access"),
    ],
)
def test_disallowed_construct_is_named(source, construct):
    with pytest.raises(ExpressionError) as info:
        parse(source)
    assert construct in str(info.value)
    assert repr(source) in str(info.value)


def test_conditional_expression_points_to_where():
    with pytest.raises(ExpressionError, match=r"use where\(cond, a, b\)"):
        parse("a if b else c")


def test_import_call_is_an_unknown_function():
    with pytest.raises(ExpressionError, match="unknown function '__import__'"):
        parse("__import__('os')")


def test_unknown_function_suggests_and_lists():
    with pytest.raises(ExpressionError) as info:
        parse("sqr(x)")
    message = str(info.value)
    assert message.startswith(
        "unknown function 'sqr' in expression 'sqr(x)'; "
        "did you mean 'sqrt'? available functions: ")
    assert "available functions: " + ", ".join(sorted(FUNCTIONS)) in message


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("sqrt(x, y)", "function 'sqrt' takes 1 argument, got 2"),
        ("sqrt()", "function 'sqrt' takes 1 argument, got 0"),
        ("where(c, a)", "function 'where' takes 3 arguments, got 2"),
        ("hypot(a)", "function 'hypot' takes 2 arguments, got 1"),
        ("sum(x, 0)", "function 'sum' takes 1 argument, got 2"),
        ("max(x, 0, 1)", "function 'max' takes 1 or 2 arguments, got 3"),
        ("count()", "function 'count' takes 1 argument, got 0"),
    ],
)
def test_wrong_arity(source, expected):
    with pytest.raises(ExpressionError, match=f"^{expected.replace('(', '[(]')}"):
        parse(source)


@pytest.mark.parametrize(("source", "column"), [("a > > b", 5), ("  a > > b", 7), ("sqrt(x", 5)])
def test_syntax_error_names_the_column(source, column):
    with pytest.raises(ExpressionError) as info:
        parse(source)
    message = str(info.value)
    assert message.startswith(f"invalid syntax in expression {source!r} at column {column}")


@pytest.mark.parametrize(("source", "column"), [("MET_pt +", 9), ("  (a > 1) & ", 12)])
def test_expression_that_ends_too_early_points_at_its_end(source, column):
    with pytest.raises(ExpressionError) as info:
        parse(source)
    message = str(info.value)
    assert message.startswith(f"invalid syntax in expression {source!r} at column {column}: "
                              "the expression ends too early")
    assert message.endswith("\n" + " " * (column + 1) + "^")  # under the end, not column 1


def test_syntax_error_shows_a_caret_under_the_column():
    with pytest.raises(ExpressionError) as info:
        parse("a > > b")
    assert "\n  a > > b\n      ^" in str(info.value)


def test_syntax_error_on_a_later_line_names_line_and_column():
    with pytest.raises(ExpressionError, match="at line 2, column 1"):
        parse("a\n+")


@pytest.mark.parametrize("source", ["", "   ", "a b", "1 +"])
def test_incomplete_expressions_are_syntax_errors(source):
    with pytest.raises(ExpressionError, match="invalid syntax"):
        parse(source)


def test_non_string_source_is_an_error():
    with pytest.raises(ExpressionError, match="must be a string, got 3"):
        parse(3)  # type: ignore[arg-type]


def test_field_path_is_in_parse_errors():
    with pytest.raises(ExpressionError) as info:
        parse("x.y", field_path="data.derived.pt")
    assert "at spec field data.derived.pt" in str(info.value)
    assert info.value.field_path == "data.derived.pt"


def test_deep_nesting_is_an_error_not_a_crash():
    with pytest.raises(ExpressionError):
        parse("-" * 100_000 + "x")


# --- names -----------------------------------------------------------------------------------


def test_expression_records_source_names_and_functions():
    expr = parse("(sqrt(MET_px**2) > 20) & (count(Jet_pt) >= nJet)")
    assert isinstance(expr, Expression)
    assert expr.source == "(sqrt(MET_px**2) > 20) & (count(Jet_pt) >= nJet)"
    assert expr.names == frozenset({"MET_px", "Jet_pt", "nJet"})
    assert expr.functions == frozenset({"sqrt", "count"})


def test_check_names_accepts_known_names():
    parse("a + b").check_names(["a", "b", "c"])  # must not raise
    assert parse("a + b").names <= {"a", "b", "c"}


def test_check_names_suggests_closest_and_lists_available():
    available = ["Jet_Pz", "Jet_Px", "MET_px"] + [f"branch{i:02d}" for i in range(30)]
    with pytest.raises(ExpressionError) as info:
        parse("Jet_pz + MET_px").check_names(available, field_path="data.features[0]")
    message = str(info.value)
    assert message.startswith("unknown name 'Jet_pz' in expression 'Jet_pz + MET_px'; "
                              "did you mean 'Jet_Pz'")
    assert "available names: Jet_Px, Jet_Pz, MET_px, branch00" in message
    assert "branch29" not in message and "(13 more)" in message
    assert "at spec field data.features[0]" in message


def test_check_names_reports_every_unknown_name():
    with pytest.raises(ExpressionError) as info:
        parse("alpha + bet + zzz", field_path="data.cut").check_names(["alpha", "beta"])
    message = str(info.value)
    assert "unknown names 'bet' (did you mean 'beta'?), 'zzz' in expression" in message
    assert "at spec field data.cut" in message


def test_missing_name_at_evaluate_time(arrays):
    with pytest.raises(ExpressionError) as info:
        parse("jj + 1", field_path="data.weight").evaluate(arrays)
    assert isinstance(info.value, ValueError) and not isinstance(info.value, KeyError)
    message = str(info.value)
    assert "unknown name 'jj'" in message and "did you mean 'j'" in message
    assert "available names: a, f, j, jb, ji, n, t" in message
    assert "at spec field data.weight" in message


def test_evaluation_failure_is_wrapped_with_field_path():
    data = {"x": np.arange(3.0), "y": np.arange(4.0)}
    with pytest.raises(ExpressionError, match="cannot evaluate expression 'x \\+ y'") as info:
        parse("x + y", field_path="data.cut").evaluate(data)
    assert info.value.field_path == "data.cut"


@pytest.mark.parametrize(
    ("source", "expected"),
    [("Jet_pt", True), ("  nJet ", True), ("_x1", True), ("a+b", False), ("sqrt(x)", False),
     ("1x", False), ("", False), ("and", False), ("True", False), ("x.y", False)],
)
def test_is_identifier(source, expected):
    assert is_identifier(source) is expected


def test_an_expression_survives_pickling_for_spawned_workers(arrays):
    """DataLoader workers started by spawn receive the dataset, expressions included, pickled."""
    import pickle

    original = parse("sum(j * 2) + where(t, f, n)", field_path="data.derived.x")
    copy = pickle.loads(pickle.dumps(original))
    assert copy.source == original.source and copy.field_path == "data.derived.x"
    assert copy.names == original.names == {"j", "t", "f", "n"}
    assert as_list(copy.evaluate(arrays)) == as_list(original.evaluate(arrays))
    with pytest.raises(ExpressionError, match="data.derived.x"):
        copy.evaluate({"j": arrays["j"]})  # errors still name the field


def test_one_element_of_each_list_by_a_whole_number_missing_when_short(arrays):
    # the leading jet, the second, the last: what max(Jet_pt, 0) cannot say
    assert as_list(parse("j[0]").evaluate(arrays)) == [1.5, None, 4.0]
    assert as_list(parse("j[1]").evaluate(arrays)) == [-2.0, None, None]
    assert as_list(parse("j[-1]").evaluate(arrays)) == [-2.0, None, 4.0]
    assert as_list(parse("ji[-2] + 1").evaluate(arrays)) == [4, None, None]
    assert as_list(parse("(j * 2)[0]").evaluate(arrays)) == [3.0, None, 8.0]
    with pytest.raises(ExpressionError, match=r"f\[0\] needs a jagged collection"):
        parse("f[0]").evaluate(arrays)


def test_a_missing_element_stays_missing_an_integer_stays_an_integer(arrays):
    ids = {"id": ak.Array([[6, 2], [1], [], [2, 6]])}
    # bit 2 of the leading object's id; an event without objects is missing, not "true"
    assert as_list(parse("bitwise_and(id[0], 4) > 0").evaluate(ids)) == [True, False, None,
                                                                           False]
    # where() fills a missing element where the branch not taken is the missing one
    assert as_list(parse("where(count(j) > 0, j[0], -1)").evaluate(arrays)) == [1.5, -1, 4.0]
    assert as_list(parse("where(isnan(j[1]), 0, j[1])").evaluate(arrays)) == [-2.0, 0, 0]
    assert as_list(parse("where(t, j[0], f)").evaluate(arrays)) == [1.5, 0.0, 4.0]
