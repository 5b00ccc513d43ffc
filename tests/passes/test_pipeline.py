"""Pipeline text: parsing, canonical printing (round trip, property-tested) and every error case."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Literal

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from effc.errors import PipelineError
from effc.passes import EffcPass, PassOptions, Pipeline, describe_passes, format_pass, parse_pipeline
from effc.passes import base as passes_base
from effc.passes.pipeline import field_specs
from effc.passes.prune import PrunePass


@dataclasses.dataclass(frozen=True)
class DemoOptions(PassOptions):
    flag: bool = False
    count: int = 3
    scale: float = 0.5
    label: str = "abc"
    limit: float | None = None
    tag: str | None = "x"
    names: tuple[str, ...] = ("a",)
    mode: str = dataclasses.field(default="fast", metadata={"choices": ("fast", "slow"), "help": "speed"})
    level: Literal["lo", "hi"] = "lo"


class DemoPass(EffcPass):
    name = "demo"
    summary = "test-only pass with one option of every supported type"
    Options = DemoOptions

    def call(self, model):  # pragma: no cover - never run
        raise NotImplementedError


@contextlib.contextmanager
def demo_registered():
    passes_base._REGISTRY["demo"] = DemoPass
    try:
        yield
    finally:
        del passes_base._REGISTRY["demo"]


def test_parse_values_typed_by_field():
    with demo_registered():
        p = parse_pipeline(
            " demo( flag=true, count=-7, scale=1e-3, label='a, b', limit=none, tag=none, names=x/*.w ,mode=slow) ,dce"
        )
    assert len(p) == 2 and p.names == ["demo", "dce"]
    o = p[0].options
    assert o == DemoOptions(True, -7, 0.001, "a, b", None, None, ("x/*.w",), "slow", "lo")
    assert isinstance(o.scale, float) and isinstance(o.count, int)


def test_canonical_text_only_non_defaults_in_field_order():
    assert str(parse_pipeline("prune(min_params=0, sparsity=0.5, method=wanda)")) == "prune(method=wanda,min_params=0)"
    assert format_pass("demo", DemoOptions()) == "demo"
    text = format_pass("demo", DemoOptions(scale=1e-5, label="two words", tag="none", names=("p", 'q"r'), limit=0.1))
    assert text == 'demo(scale=1e-05,label="two words",limit=0.1,tag="none",names=[p,"q\\"r"])'
    with demo_registered():
        assert parse_pipeline(text)[0].options.tag == "none"
        assert parse_pipeline("demo(tag=none)")[0].options.tag is None
        assert str(parse_pipeline("demo(tag=none)")) == "demo(tag=none)"


def test_literal_field_is_a_choice_and_numpy_floats_print_exactly():
    with demo_registered():
        assert parse_pipeline("demo(level=hi)")[0].options.level == "hi"
        with pytest.raises(PipelineError, match="'mid' is not one of lo, hi"):
            parse_pipeline("demo(level=mid)")
        described = next(d for d in describe_passes() if d["name"] == "demo")
        assert described["options"][-1] == {"name": "level", "type": "one of lo|hi", "default": "lo", "help": "",
                                             "choices": ["lo", "hi"]}
        text = format_pass("demo", DemoOptions(scale=np.float32(0.1)))
        assert text == "demo(scale=0.10000000149011612)"
        assert parse_pipeline(text)[0].options.scale == np.float32(0.1)


def test_single_word_for_tuple_is_one_tuple_and_empty_text_is_empty():
    assert parse_pipeline("prune(include=/ffn/*)")[0].options.include == ("/ffn/*",)
    assert parse_pipeline("prune(include=[])")[0].options.include == ()
    assert len(parse_pipeline("")) == 0 and len(parse_pipeline("   ")) == 0 and str(Pipeline()) == ""


def test_calibration_is_handed_to_passes():
    marker = object()
    assert parse_pipeline("prune,dce", calibration=marker)[0].calibration is marker


def _strategy_for(spec):
    if spec.choices:
        base = st.sampled_from(spec.choices)
    elif spec.base is bool:
        base = st.booleans()
    elif spec.base is int:
        base = st.integers(-(10**12), 10**12) | st.integers(0, 5000)
    elif spec.base is float:
        base = st.floats(0, 1) | st.floats(allow_nan=False, allow_infinity=False)
    else:
        base = st.text(max_size=12)
    if spec.is_tuple:
        base = st.lists(base, max_size=4).map(tuple)
    if spec.optional:
        base = base | st.none()
    return st.just(spec.default) | base


@st.composite
def random_pass(draw, classes):
    cls = draw(st.sampled_from(classes))
    kwargs = {spec.name: draw(_strategy_for(spec)) for spec in field_specs(cls.Options)}
    try:
        return cls(**kwargs)
    except PipelineError:
        assume(False)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(data=st.data())
def test_round_trip_property(data):
    with demo_registered():
        classes = list(passes_base.registered_passes().values())
        pipeline = Pipeline(data.draw(st.lists(random_pass(classes), max_size=5)))
        text = str(pipeline)
        again = parse_pipeline(text)
        assert again == pipeline, text
        assert str(again) == text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("prnue(sparsity=0.5)", "unknown pass 'prnue' at column 1"),
        ("dce,clenup", "unknown pass 'clenup' at column 5"),
        ("prune(sparsty=0.5)", "pass 'prune' has no option 'sparsty' at column 7"),
        ("prune(sparsity=abc)", "bad value for prune(sparsity=...): 'abc' is not a number at column 16"),
        ("prune(min_params=1.5)", "'1.5' is not an integer"),
        ("prune(sparsity='0.5')", "'0.5' is not a number"),
        ("prune(sparsity=[0.5])", "a list is not allowed here, expected float"),
        ("prune(granularity=col)", "'col' is not one of layer, row"),
        ("prune(sparsity=1.5)", "prune(sparsity=1.5): sparsity must be a fraction in [0, 1]"),
        ("prune(sparsity=0.5", "expected ')', found end of text at column 19"),
        ("prune(sparsity=0.5,sparsity=0.2)", "option 'sparsity' of 'prune' given twice at column 20"),
        ("prune(sparsity)", "expected '=', found ')' at column 15"),
        ("dce,,cse", "expected a pass name, found ',' at column 5"),
        ("dce cse", "expected ',', found 'cse' at column 5"),
        ("dce,", "expected a pass name, found end of text at column 5"),
        ("prune(include='abc)", "unterminated quoted string at column 15"),
        ("prune(include=[a,b)", "expected ']', found ')' at column 19"),
        ("dce(x=1)", "pass 'dce' has no option 'x'"),
        ("cse(size_limit=-1)", "invalid value size_limit=-1"),
        ("dce;cse", "unexpected character ';' at column 4"),
    ],
)
def test_errors_point_at_the_token(text, expected):
    with pytest.raises(PipelineError) as info:
        parse_pipeline(text)
    assert expected in str(info.value)


def test_unknown_names_list_candidates_closest_first():
    with pytest.raises(PipelineError) as info:
        parse_pipeline("dce,prnue")
    err = info.value
    assert err.hint.startswith("did you mean 'prune'? registered passes: prune,")
    assert {"dce", "cse", "cleanup", "identity-elim"} <= set(err.hint.split(": ", 1)[1].split(", "))
    assert err.pos == 4 and err.caret.splitlines()[1] == "    ^^^^^"
    with pytest.raises(PipelineError) as info:
        parse_pipeline("prune(metod=wanda)")
    assert info.value.hint.startswith("did you mean 'method'? options of 'prune': method,")
    assert "min_params" in info.value.hint and "exclude" in info.value.hint


@pytest.mark.parametrize(
    "text,hint",
    [
        ("prune(", "options of 'prune': sparsity"),  # used to have no fix at all
        ("prune(sparsity=0.5,)", "options of 'prune': sparsity"),
        ("dce;cse", "separate passes with ','"),  # used to say "quote values with special characters"
        ("PRUNE", "did you mean 'prune'?"),
    ],
)
def test_errors_carry_a_fix(text, hint):
    with pytest.raises(PipelineError) as info:
        parse_pipeline(text)
    assert info.value.hint and hint in info.value.hint


def test_direct_construction_validates_and_rejects_unknown_options():
    with pytest.raises(PipelineError, match=r"prune\(sparsity=-0.1\): sparsity must be a fraction in \[0, 1\]"):
        PrunePass(sparsity=-0.1)
    with pytest.raises(PipelineError, match="scope=global"):
        PrunePass(scope="global", granularity="row")
    with pytest.raises(PipelineError, match="has no option 'foo'"):
        PrunePass(foo=1)


def test_describe_passes_lists_options_with_types_and_defaults():
    described = {d["name"]: d for d in describe_passes()}
    assert {"dce", "cse", "identity-elim", "cleanup", "prune"} <= set(described)
    prune = described["prune"]
    assert prune["exact"] is False and prune["uses_calibration"] is True and prune["summary"]
    opts = {o["name"]: o for o in prune["options"]}
    assert [o["name"] for o in prune["options"]][:2] == ["sparsity", "method"]
    assert opts["sparsity"]["type"] == "float" and opts["sparsity"]["default"] == 0.5 and opts["sparsity"]["help"]
    assert opts["include"]["type"] == "tuple[str, ...]" and opts["include"]["default"] == []
    assert opts["granularity"]["choices"] == ["layer", "row"]
    assert described["dce"]["exact"] is True and described["dce"]["options"] == []
