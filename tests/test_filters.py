"""Table-driven tests for containerd's filter syntax (ckfs.filters).

The corpus and many cases follow containerd's ``pkg/filters/filter_test.go``
so that a filter a user learned on ``ctr`` selects the same objects here.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import pytest

from ckfs.errors import InvalidArgument
from ckfs.filters import ALWAYS, MAX_PATTERN_SIZE, Operator, adaptor_for, parse_filters


def _entry(name: str, other: str = "", **labels: str) -> tuple[dict[str, str], dict[str, str]]:
    fields = {"name": name}
    if other:
        fields["other"] = other
    return fields, dict(labels)


CORPUS: list[tuple[Mapping[str, str], Mapping[str, str]]] = [
    _entry("foo", foo="true"),  # 0
    _entry("bar"),  # 1
    ({"name": "foo"}, {"foo": "present", "more complex label": "present"}),  # 2
    _entry("bar", bar="true"),  # 3
    ({"name": "fooer"}, {'more complex label with \\ and "': "present"}),  # 4
    ({"name": "fooer"}, {'more complex label with \\ and ".post': "present"}),  # 5
    _entry("baz", other="too complex, yo"),  # 6
    _entry("bazo", other="abc"),  # 7
    _entry("compound", foo="omg_asdf.asdf-qwer"),  # 8
    ({"name": "docker.io/library/alpine:3.20"}, {"io.example.team": "a,b"}),  # 9
]
ALL = list(range(len(CORPUS)))


def _select(filters: Sequence[str]) -> list[int]:
    f = parse_filters(filters)
    return [i for i, (fields, labels) in enumerate(CORPUS) if f.match(adaptor_for(fields, labels))]


MATCH_CASES = [
    ("empty-sequence", [], ALL),
    ("empty-string", [""], ALL),
    ("present", ["name"], ALL),
    ("label-present", ["labels.foo"], [0, 2, 8]),
    ("label-and-name-present", ["labels.foo,name"], [0, 2, 8]),
    ("label-value", ["labels.foo==true"], [0]),
    ("label-value-punctuated", ["labels.foo==omg_asdf.asdf-qwer"], [8]),
    ("name", ["name==bar"], [1, 3]),
    ("name-not-equal", ["name!=bar"], [0, 2, 4, 5, 6, 7, 8, 9]),
    ("not-equal-absent-field", ["other!=abc"], [0, 1, 2, 3, 4, 5, 6, 8, 9]),
    ("name-and-label", ["name==bar,labels.bar"], [3]),
    ("quoted-value", ['other=="too complex, yo"'], [6]),
    ("regexp", ["other~=[abc]+,name!=foo"], [6, 7]),
    ("regexp-slash-quoted", ["other~=/[abc]+/,name!=foo"], [6, 7]),
    ("regexp-slash-quoted-comma", ["other~=/[abc]{1,2}/,name!=foo"], [6, 7]),
    ("regexp-pipe-quoted", [r"name~=|^ba(r\|z)$|"], [1, 3, 6]),
    ("regexp-escape-kept", [r"name~=/\d+\.\d+$/"], [9]),
    ("regexp-escaped-delimiter", [r"name~=/library\/alpine/"], [9]),
    ("regexp-garbage", ['other~=/[abc]{0,1}"\\//,name!=foo'], []),
    ("regexp-is-search", ["name~=oo"], [0, 2, 4, 5]),
    ("name-and-label-value", ["name==bar,labels.bar==true"], [3]),
    ("name-and-label-value-no-match", ["name==bar,labels.bar==wrong"], []),
    ("quoted-fieldpath", ['name==foo,labels."more complex label"'], [2]),
    ("quoted-fieldpath-escapes", [r'labels."more complex label with \\ and \""==present'], [4]),
    ("quoted-fieldpath-then-field", [r'labels."more complex label with \\ and \"".post'], [5]),
    ("dotted-label-quoted", ['labels."io.example.team"=="a,b"'], [9]),
    ("dotted-label-unquoted", ["labels.io.example.team"], [9]),
    ("value-with-slashes", ["name==docker.io/library/alpine:3.20"], [9]),
    ("or", ["name==bar", "labels.foo==true"], [0, 1, 3]),
    ("or-with-and", ["name==bar,labels.bar", "name==compound"], [3, 8]),
    ("or-with-empty-matches-all", ["name==nothing", ""], ALL),
    ("spaces-around-separators", ["name==bar , labels.bar"], [3]),
    ("hex-and-unicode-escapes", [r'name=="\x66\u006fo"'], [0, 2]),
    ("octal-escape", [r'name=="\142ar"'], [1, 3]),
    ("absent-label-not-equal-empty", ['labels.nope!=""'], []),
]


@pytest.mark.parametrize(
    ("filters", "expected"),
    [pytest.param(f, e, id=name) for name, f, e in MATCH_CASES],
)
def test_match(filters: list[str], expected: list[int]) -> None:
    assert _select(filters) == expected


EXPECTED_FIELD = 'expected a field name or a "quoted" field'

ERROR_CASES = [
    (
        "label-alt-quote-in-field",
        "labels.|foo|==omg_asdf.asdf-qwer",
        "filters: parse error: [labels. >|||< foo|==omg_asdf.asdf-qwer]: " + EXPECTED_FIELD,
    ),
    (
        "bad-field-char",
        'labels.?"more".post==present',
        'filters: parse error: [labels. >|?|< "more".post==present]: ' + EXPECTED_FIELD,
    ),
    (
        "trailing-comma",
        "name==foo,",
        "filters: parse error: [name==foo,]: " + EXPECTED_FIELD,
    ),
    (
        "trailing-field-separator",
        "labels.",
        "filters: parse error: [labels.]: " + EXPECTED_FIELD,
    ),
    (
        "missing-value",
        "image~=,id?=?fbaq",
        "filters: parse error: [image~= >|,|< id?=?fbaq]: expected a value or a quoted value",
    ),
    (
        "missing-value-at-end",
        "name==",
        "filters: parse error: [name==]: expected a value or a quoted value",
    ),
    (
        "slash-in-field",
        "labels.ns/key==value",
        'filters: parse error: [labels.ns >|/|< key==value]: expected an operator ("=="|"!="|"~=")',
    ),
    (
        "regex-quote-not-terminated",
        "labels.key~=/value",
        "filters: parse error: [labels.key~= >|/|< value]: quoted literal not terminated",
    ),
    (
        "double-quote-not-terminated",
        'name=="abc',
        'filters: parse error: [name== >|"|< abc]: quoted literal not terminated',
    ),
    (
        "single-equals",
        "name=foo",
        "filters: parse error: [name >|=|< foo]: unsupported operator '='",
    ),
    (
        "illegal-escape",
        r'name=="a\qb"',
        r'filters: parse error: [name=="a >|\|< qb"]: illegal escape sequence',
    ),
    (
        "short-hex-escape",
        r'name=="\x6"',
        r'filters: parse error: [name==" >|\|< x6"]: illegal numeric escape sequence',
    ),
    (
        "unexpected-after-value",
        "name==foo bar",
        "filters: parse error: [name==foo  >|b|< ar]: unexpected input: b",
    ),
    (
        "bad-regexp",
        "name~=[abc",
        "filters: parse error: [name~= >|[|< abc]: invalid regular expression '[abc': "
        "missing ]: [abc",
    ),
    (
        # RE2, like containerd's Go regexp, has no backreferences or lookaround:
        # they cannot run in linear time.
        "regexp-backreference",
        r"name~=/(a)\1/",
        r"filters: parse error: [name~= >|/|< (a)\1/]: invalid regular expression '(a)\\1': "
        r"invalid escape sequence: \1",
    ),
    (
        "regexp-lookahead",
        "name~=/a(?=b)/",
        "filters: parse error: [name~= >|/|< a(?=b)/]: invalid regular expression 'a(?=b)': "
        "invalid perl operator: (?=",
    ),
]


@pytest.mark.parametrize(
    ("text", "message"), [pytest.param(t, m, id=name) for name, t, m in ERROR_CASES]
)
def test_parse_error(text: str, message: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_filters([text])
    assert str(info.value) == message


def test_error_in_any_alternative_fails_the_whole_filter() -> None:
    with pytest.raises(InvalidArgument):
        parse_filters(["name==ok", "name=bad"])


def test_bare_string_is_one_filter() -> None:
    # Iterating "name==bar" character by character would be a silent bug.
    assert parse_filters("name==bar") == parse_filters(["name==bar"])


def test_structure() -> None:
    f = parse_filters(['labels."a.b"~=x,name', "name!=y"])
    (s1, s2), (s3,) = f.alternatives
    assert (s1.fieldpath, s1.operator, s1.value) == (("labels", "a.b"), Operator.MATCHES, "x")
    assert s1.pattern is not None
    assert (s2.fieldpath, s2.operator) == (("name",), Operator.PRESENT)
    assert (s3.fieldpath, s3.operator, s3.value) == (("name",), Operator.NOT_EQUAL, "y")
    assert parse_filters([]) is ALWAYS


def test_equal_requires_presence_but_not_equal_does_not() -> None:
    # containerd: `==` needs the field present; `!=` compares against "" when absent.
    adapt = adaptor_for({}, {})
    assert parse_filters(["labels.x!=v"]).match(adapt)
    assert not parse_filters(["labels.x==v"]).match(adapt)


def test_adaptor_for_dotted_fields_and_labels() -> None:
    adapt = adaptor_for({"target.digest": "sha256:x", "name": ""}, {"a.b": "1"})
    assert adapt(["target", "digest"]) == ("sha256:x", True)
    assert adapt(["name"]) == ("", True)
    assert adapt(["missing"]) == ("", False)
    assert adapt(["labels", "a", "b"]) == ("1", True)
    assert adapt(["labels", "a.b"]) == ("1", True)
    assert adapt(["labels"]) == ("", False)
    assert adapt([]) == ("", False)
    assert adaptor_for({"x": "1"})(["labels", "x"]) == ("", False)


def test_catastrophic_pattern_runs_in_linear_time() -> None:
    # Backtracking takes 0.84 s on 25 characters and doubles with each one more;
    # a filter from any ckfsd client must not freeze the daemon. RE2 answers at once.
    f = parse_filters(["labels.x~=/^(a+)+$/"])
    value = "a" * 10_000 + "b"
    began = time.monotonic()
    assert not f.match(adaptor_for({}, {"x": value}))
    assert f.match(adaptor_for({}, {"x": "a" * 10_000}))
    assert time.monotonic() - began < 1.0  # generous: milliseconds in practice


def test_pattern_size_is_bounded() -> None:
    assert parse_filters(["name~=" + "a" * MAX_PATTERN_SIZE]).match(
        adaptor_for({"name": "a" * MAX_PATTERN_SIZE})
    )
    with pytest.raises(InvalidArgument, match=r"1025 bytes, over the limit of 1024$"):
        parse_filters(["name~=" + "a" * (MAX_PATTERN_SIZE + 1)])


def test_regexp_is_utf8_and_survives_lone_surrogates() -> None:
    assert parse_filters(["name~=^.$"]).match(adaptor_for({"name": "é"}))  # two bytes
    # A lone surrogate (from JSON, or a name read with surrogateescape) neither
    # raises nor hides the rest of the value.
    f = parse_filters(["name~=^x"])
    assert f.match(adaptor_for({"name": "x\udcff"}))
    assert not f.match(adaptor_for({"name": "\udcffx"}))
