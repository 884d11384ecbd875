from __future__ import annotations

import re
import time

import jinja2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from markupsafe import escape

from streams.copy import language
from streams.copy.language import (
    CompiledTemplate,
    MissingField,
    RenderTimeout,
    TemplateSyntaxError,
    compile_template,
    compiled,
    to_jinja,
)

pytestmark = pytest.mark.unit

CTX = {
    "name": "Lin",
    "userName": "lin88",
    "age": 31,
    "n": 2,
    "price": 9,
    "stock": "3",
    "city": "上海",
    "tier": "silver",
    "user": {"vip_level": 3, "city": "上海"},
    "items": [{"name": "Earbuds"}, {"name": "Case"}],
    "empty": [],
}

# (source, context overrides, expected output)
GOLDEN = [
    ("<#if age>30>older<#else>younger</#if>", {}, "older"),
    ("<#if age>30>older<#else>younger</#if>", {"age": 30}, "younger"),
    ("<#if age>30>older<#else>younger</#if>", {"age": None}, "younger"),
    ("<#if age > 30>older</#if>", {}, "older"),
    ("<#if age>=31>yes</#if>", {}, "yes"),
    ("<#if age >= 18 && vip??>adult vip<#else>not both</#if>", {}, "not both"),
    ("<#if age >= 18 && vip??>adult vip<#else>not both</#if>", {"vip": True}, "adult vip"),
    ("<#if age gt 30>a</#if><#if age gte 31>b</#if><#if age lt 32>c</#if><#if age lte 31>d</#if>", {}, "abcd"),
    ("<#if age gt 31>a</#if><#if age gte 32>b</#if><#if age lt 31>c</#if><#if age lte 30>d</#if>", {}, ""),
    ("<#if !vip??>guest<#else>member</#if>", {}, "guest"),
    ("<#if !(age > 40)>under 40</#if>", {}, "under 40"),
    ("<#if (age > 40 || n == 2) && !(name == 'Bob')>yes<#else>no</#if>", {}, "yes"),
    ("<#if (age > 40 || n == 3) && name != 'Bob'>yes<#else>no</#if>", {}, "no"),
    ("<#if city == \"上海\">沪</#if><#if tier != 'gold'> not gold</#if>", {}, "沪 not gold"),
    ('<#if name > "A">after A</#if><#if name < "A">before A</#if>', {}, "after A"),
    ("<#if stock > 2>numeric string compares as a number</#if>", {}, "numeric string compares as a number"),
    ("<#if missing != 'x'>ne<#else>a missing value compares false</#if>", {}, "a missing value compares false"),
    ("<#if vip>VIP<#elseif n gt 1>many<#elseif n == 1>one<#else>none</#if>", {}, "many"),
    ("<#if age gt 18><#if n gt 1>adult, many<#else>adult, one</#if><#else>minor</#if>", {}, "adult, many"),
    ("<#if n>1>s</#if>", {}, "s"),
    ("<#if name??><b>${name}</b></#if>", {}, "<b>Lin</b>"),
    ("<#if (age>30)>older</#if>", {}, "older"),
    ('<#if name == "a>b">quoted > is text</#if>', {"name": "a>b"}, "quoted > is text"),
    ("<#if true && !false>literal booleans</#if>", {}, "literal booleans"),
    ("<#list items as item>${item.name} </#list>", {}, "Earbuds Case "),
    ("<#list empty as item>${item.name}<#else>empty cart</#list>", {}, "empty cart"),
    ("<#list user.tags as tag>#${tag} </#list>", {"user": {"tags": ["a", "b"]}}, "#a #b "),
    ("{userName} is level ${user.vip_level} in ${ user.city }", {}, "lin88 is level 3 in 上海"),
    ("${items.1.name}", {}, "Case"),
    ('Hi ${nick!"friend"}, ${count!0} new', {}, "Hi friend, 0 new"),
    ("Hi ${nick!'friend'}", {"nick": "Kai"}, "Hi Kai"),
    ("{{ name|upper }}{% for i in items %} {{ loop.index }}.{{ i.name }}{% endfor %}", {}, "LIN 1.Earbuds 2.Case"),
    ("{% if age > 30 %}{{ name }}{% endif %}{# a comment #}", {}, "Lin"),
    ("Only ${{ price }}!", {}, "Only $9!"),
    ("{{ {'a': {'b': 1}}['a']['b'] }} {{ '}}' }}", {}, "1 }}"),
    ('{"id": 1} {a b} {1x} {x.} $ 100% #1 <b> {', {}, '{"id": 1} {a b} {1x} {x.} $ 100% #1 <b> {'),
    (
        "亲爱的${name}，购物车🛒里还有<#if n gt 1>${n}件<#else>一件</#if>商品！🎉",
        {},
        "亲爱的Lin，购物车🛒里还有2件商品！🎉",
    ),
    ("Hi\n<#if age gt 18>\n  adult\n<#else>\n  minor\n</#if>\nbye\n", {}, "Hi\n  adult\nbye\n"),
    ("<#list items as item>\n- ${item.name}\n</#list>\n", {}, "- Earbuds\n- Case\n"),
    ("<#-- note for the team -->Hi ${name}", {}, "Hi Lin"),
    ("a\r\nb ${name}\r\n", {}, "a\nb Lin\n"),
    ("${self!'self is data'} ${none!'none too'}", {}, "self is data none too"),
    ("${loop_count}", {"loop_count": 0}, "0"),
]


@pytest.mark.parametrize(("source", "overrides", "expected"), GOLDEN)
def test_golden(source: str, overrides: dict, expected: str) -> None:
    assert compile_template(source).render({**CTX, **overrides}) == expected


# (source, line, column, part of the message)
AUTHORING_ERRORS = [
    ("Hello\n<#if age > 30>unclosed", 2, 1, "<#if> is never closed"),
    ("ok</#if>", 1, 3, "</#if> without a matching <#if>"),
    ("<#if age >>x</#if>", 1, 11, "needs a value after '>'"),
    ("<#if>x</#if>", 1, 5, "the condition is empty"),
    ("<#if a，b>x</#if>", 1, 7, "unexpected '，'"),
    ("<#if a b>x</#if>", 1, 8, "unexpected 'b'"),
    ("a <#sep>", 1, 3, "unknown directive <#sep>"),
    ("x\n</#macro>", 2, 1, "unknown closing tag </#macro>"),
    ("<#if a>x<#else>y<#else>z</#if>", 1, 17, "a second <#else>"),
    ("<#if a>x<#else>y<#elseif b>z</#if>", 1, 17, "<#elseif> after <#else>"),
    ("<#list items as item><#if a>x</#list>", 1, 30, "</#list> found while <#if>"),
    ("<#list items>x</#list>", 1, 1, "<#list items as item>"),
    ("<#list items as if>x</#list>", 1, 17, "cannot name a list item"),
    ("Hi ${name!}", 1, 10, "an empty default is not allowed"),
    ('Hi ${name!""}', 1, 11, "the default is blank"),
    ("Hi ${}", 1, 4, "must hold a field name"),
    ("Hi ${name", 1, 4, "is not closed"),
    ("Hi ${name?upper_case}", 1, 10, "?built-ins are not supported"),
    ("${user.__class__}", 1, 8, "'__class__' is not a field name"),
    ("{a.__init__}", 1, 4, "'__init__' is not a field name"),
    ("{% include 'footer.html' %}", 1, 1, "include"),
    ("x\n  {%- import 'macros' as m %}", 2, 3, "import"),
    ("{% extends 'base' %}", 1, 1, "extends"),
    ("{% from 'm' import x %}", 1, 1, "from"),
    ("Hi {{ name ", 1, 4, "is not closed"),
    ("line one\nline {{ name|nosuchfilter }}", 2, 6, "nosuchfilter"),
    ("{% raw %}${x}{% endraw %}", 1, 10, "would send '${' raw"),
    ("$<#if a>{</#if>", 1, 9, "would send '${' raw"),
    ("<<#list items as i>#</#list>", 1, 20, "would send '<#' raw"),
    ('Hi ${name!"${x}"}', 1, 12, "would send '${' raw"),
    ('ab\n{% set x = "<#" %}{{ x }}', 2, 13, "would send '<#' raw"),
]


@pytest.mark.parametrize(("source", "line", "column", "message"), AUTHORING_ERRORS)
def test_authoring_errors(source: str, line: int, column: int, message: str) -> None:
    with pytest.raises(TemplateSyntaxError) as caught:
        compile_template(source)
    exc = caught.value
    assert (exc.line, exc.column) == (line, column), str(exc)
    assert message in exc.message
    assert str(exc) == f"line {line}, column {column}: {exc.message}"


def test_to_jinja_reports_the_original_position_and_keeps_jinja_as_is() -> None:
    with pytest.raises(TemplateSyntaxError, match=r"^line 3, column 4: "):
        to_jinja("a\r\nb\r\nxx <#if a>")
    assert to_jinja("{{ x|upper }}{% if y %}z{% endif %}") == "{{ x|upper }}{% if y %}z{% endif %}"
    assert to_jinja("<#if age>30>a</#if>") == "{% if (age is _gt(30)) %}a{% endif %}"


def test_fields_lists_every_data_path() -> None:
    template = compile_template(
        "${name} {userName} ${user.vip_level} <#list items as item>${item.name}</#list> "
        "<#if age>1 && vip??>x</#if> {{ native }}"
    )
    assert template.fields == {"name", "userName", "user.vip_level", "items", "age", "vip", "native"}


# (source, context, the missing field)
MISSING = [
    ("Hi ${name}", {}, "name"),
    ("Hi ${name}", {"name": None}, "name"),
    ("Hi ${name}", {"name": ""}, "name"),
    ("Hi {name}", {"name": "  \n"}, "name"),
    ("Level ${user.vip_level}", {}, "user.vip_level"),
    ("Level ${user.vip_level}", {"user": None}, "user.vip_level"),
    ("Level ${user.vip_level}", {"user": {}}, "user.vip_level"),
    ("<#list items as item>${item.name}</#list>", {}, "items"),
    ("<#list items as item>${item.name}</#list>", {"items": [{"name": "a"}, {}]}, "item.name"),
    ("Hi {{ name }}", {}, "name"),
]


@pytest.mark.parametrize(("source", "context", "field"), MISSING)
def test_missing_field_names_the_field(source: str, context: dict, field: str) -> None:
    with pytest.raises(MissingField) as caught:
        compile_template(source).render(context)
    assert caught.value.field == field
    assert isinstance(caught.value, LookupError)


def test_defaults_inline_first_then_campaign() -> None:
    template = compile_template('Hi ${name}, ${user.city}, ${nick!"pal"}')
    rendered = template.render({"name": " "}, defaults={"name": "friend", "user.city": "your city", "nick": "x"})
    assert rendered == "Hi friend, your city, pal"
    with pytest.raises(MissingField, match="user.city"):
        template.render({}, defaults={"name": "friend", "user.city": ""})
    assert compile_template("<#list items as i>${i}</#list>").render({}, defaults={"items": ["a"]}) == "a"


def test_missing_is_fine_in_conditions() -> None:
    template = compile_template("<#if name??>${name}<#elseif user.vip_level gt 2>vip<#else>friend</#if>")
    assert template.render({}) == "friend"
    assert template.render({"name": "", "user": {"vip_level": "3"}}) == "vip"


def test_values_are_inserted_as_data() -> None:
    data = {"name": "${x} <#if a>{y}</#if> {{ 7*7 }} {% raw %}"}
    assert compile_template("Hi ${name}").render(data) == f"Hi {data['name']}"
    assert compile_template("Hi {{ name }}").render(data) == f"Hi {data['name']}"


@pytest.mark.parametrize(
    ("source", "html", "expected"),
    [
        ("<p>${name} {{ name }} ${nick!'<i>'}</p>", True, "<p>&lt;b&gt;&amp; &lt;b&gt;&amp; &lt;i&gt;</p>"),
        ("<p>${name} {{ name }} ${nick!'<i>'}</p>", False, "<p><b>& <b>& <i></p>"),
    ],
)
def test_html_escaping(source: str, html: bool, expected: str) -> None:
    assert compile_template(source, html=html).render({"name": "<b>&"}) == expected


# Each must fail with a clear error, at save time or at render time, naming nothing of the sandbox's insides.
ESCAPES = [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "${name.__class__}",
    "{name.__globals__}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ self._TemplateReference__context }}",
    "{{ name|attr('__class__') }}",
    "{{ ('{0.__class__}'|attr('format'))(name) }}",
    "{{ '{0.__class__.__base__}'.format(name) }}",
    "{{ range }}",
    "{{ namespace }}",
    "{{ lipsum(5) }}",
    "{% include '/etc/passwd' %}",
    "{% import 'os' as os %}",
    "{{ items.append(1) }}",
    "{{ user.update({'a': 1}) }}",
]


@pytest.mark.parametrize("source", ESCAPES)
def test_sandbox_escapes_fail_safely(source: str) -> None:
    with pytest.raises((TemplateSyntaxError, jinja2.TemplateError, MissingField)) as caught:
        compile_template(source).render(CTX)
    message = str(caught.value)
    assert message and not re.search(r"0x[0-9a-f]+|<class|<function|<built-in|subclasses|Traceback", message)


# (source, context): each must stop well within a second
RUNAWAYS = [
    ("{% for i in range(1000) %}{% for j in range(1000) %}{% endfor %}{% endfor %}", {}),
    ("{% for i in range(1000) %}{% for j in range(1000) %}{{ i }}{% endfor %}{% endfor %}", {}),
    ("{% for a in big %}{% for b in big %}{% for c in big %}{% endfor %}{% endfor %}{% endfor %}", {}),
    ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", {}),
    ("{% macro f(n) %}{{ f(n) }}{{ f(n) }}{% endmacro %}{{ f(1) }}", {}),
    ("{{ range(1000000)|list }}", {}),
    ("{{ 'x' * 1000000000 }}", {}),
    ("{{ [1] * 1000000000 }}", {}),
    ("{{ 9 ** 999999999 }}", {}),
    ("{{ 'x'|center(1000000000) }}", {}),
    ("{{ [1]|batch(1000000000)|list }}", {}),
    ("{{ '%999999999s'|format(1) }}", {}),
    ("{{ '{:>999999999}'.format(1) }}", {}),
    ("{{ ('x' * 60000)|replace('x', 'x' * 60000) }}", {}),
    ("{% set ns = namespace(s='x') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}", {}),
]


@pytest.mark.parametrize(("source", "context"), RUNAWAYS)
def test_runaway_templates_are_stopped(source: str, context: dict) -> None:
    template = compile_template(source)
    started = time.perf_counter()
    with pytest.raises(RenderTimeout):
        template.render({"big": list(range(1000)), **context})
    assert time.perf_counter() - started < 1.0
    assert template is not None and compile_template("ok ${name}").render({"name": "x"}) == "ok x"


def test_time_limit_is_the_callers() -> None:
    template = compile_template("{% for i in range(1000) %}{% for j in range(200) %}{% endfor %}{% endfor %}")
    assert template.render({}, time_limit_s=10.0) == ""
    with pytest.raises(RenderTimeout):
        template.render({}, time_limit_s=0.001)


def test_template_errors_are_template_errors() -> None:
    with pytest.raises(jinja2.TemplateError, match="ZeroDivisionError"):
        compile_template("{{ 1 / n }}").render({"n": 0})
    with pytest.raises(jinja2.TemplateError, match="items is not a list"):
        compile_template("<#list items as i>${i}</#list>").render({"items": "abc"})


def test_compiled_is_cached_per_key_and_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(language, "_CACHE", type(language._CACHE)())
    monkeypatch.setattr(language, "CACHE_SIZE", 2)
    first = compiled(("t1", 1, "body"), "Hi ${name}")
    assert isinstance(first, CompiledTemplate)
    assert compiled(("t1", 1, "body"), "Hi ${name}") is first
    assert compiled(("t1", 1, "body"), "Hi ${name}", html=True) is not first
    edited = compiled(("t1", 1, "body"), "Bye ${name}")
    assert edited.render({"name": "x"}) == "Bye x"
    compiled(("t2", 1, "body"), "x")
    assert len(language._CACHE) == 2
    with pytest.raises(TemplateSyntaxError):
        compiled(("bad", 1, "body"), "<#if")


# Hypothesis: text without template syntax survives unchanged; templates never send a raw placeholder.

_SPECIALS = list("${}<>#/%!\"' \n\r\t-_.aZ0中😀")
_SYNTAX = re.compile(r"\$\{|</?#|\{[{%#]|\{[A-Za-z_][A-Za-z0-9_]*(?:\.\w+)*\}")


def _plain(text: str) -> str:
    """The text with every bit of template syntax broken by a blank."""
    while match := _SYNTAX.search(text):
        text = text[: match.start() + 1] + " " + text[match.start() + 1 :]
    return text


_TEXT = st.text(st.one_of(st.sampled_from(_SPECIALS), st.characters(codec="utf-8")), max_size=40).map(_plain)


@settings(max_examples=300, deadline=None)
@given(_TEXT)
def test_plain_text_round_trips(text: str) -> None:
    expected = text.replace("\r\n", "\n").replace("\r", "\n")
    assert compile_template(text).render({}) == expected
    assert compile_template(text, html=True).render({}) == expected


_FIELDS = st.sampled_from(["${name}", "{name}", "${nick!'pal'}", "${user.city}", "${{ name }}", "{{ user.city }}"])
_CONDITIONS = st.sampled_from(["age>30", "age >= 18 && vip??", "!vip??", "city == '上海'", "n gt 1", "(a||b)"])


def _blocks(inner: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    body = st.lists(inner, max_size=3).map("".join)
    return st.one_of(
        st.builds(lambda c, a, b: f"<#if {c}>{a}<#else>{b}</#if>", _CONDITIONS, body, body),
        st.builds(lambda c, a: f"<#if {c}>{a}</#if>", _CONDITIONS, body),
        st.builds(lambda a: f"<#list items as item>{a}${{item.name}}</#list>", body),
        st.builds(lambda c, a: f"{{% if {c} %}}{a}{{% endif %}}", st.sampled_from(["age > 3", "vip"]), body),
    )


_TEMPLATES = st.recursive(st.one_of(_TEXT.map(lambda t: t[:6]), _FIELDS), _blocks, max_leaves=6)
_VALUE = st.text(st.sampled_from(list("ab >中😀.!")), min_size=1).filter(lambda v: v.strip())


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_TEMPLATES, max_size=3).map("".join), _VALUE, st.booleans(), st.integers(0, 50))
def test_no_raw_placeholder_is_ever_sent(source: str, value: str, vip: bool, age: int) -> None:
    try:
        template = compile_template(source)
    except TemplateSyntaxError:
        return  # refused at save time: fine, nothing is sent
    context = {
        "name": value,
        "user": {"city": value},
        "city": value,
        "age": age,
        "n": age,
        "a": vip,
        "b": False,
        "items": [{"name": value}] * 2,
        **({"vip": value} if vip else {}),
    }
    for html in (False, True):
        try:
            rendered = compile_template(source, html=html).render(context) if html else template.render(context)
        except MissingField:
            continue  # native {% if vip %} on absent data, strict as in Jinja
        assert "${" not in rendered and "<#" not in rendered and "</#" not in rendered


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([*_SPECIALS, "${", "<#if ", "</#if>", "{{", "}}", "{%", "%}", "x"])).map("".join))
def test_any_text_compiles_or_is_an_authoring_error(text: str) -> None:
    try:
        compile_template(text)
    except TemplateSyntaxError as exc:
        assert exc.line >= 1 and exc.column >= 1


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=1).filter(lambda v: v.strip()))
def test_values_render_verbatim(value: str) -> None:
    assert compile_template("${name}").render({"name": value}) == value
    assert compile_template("${name}", html=True).render({"name": value}) == str(escape(value))
