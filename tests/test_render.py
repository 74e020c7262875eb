"""Templates: the header block, the sandbox, errors that name file and list line; time zones."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, date, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any

import jinja2
import pytest

from appeal_mailer import timezones
from appeal_mailer.config import load_settings
from appeal_mailer.errors import TemplateError
from appeal_mailer.lists import read_recipients
from appeal_mailer.models import Recipient
from appeal_mailer.render import Renderer

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_CONFIG = ROOT / "config.example.toml"
EXAMPLE_LIST = ROOT / "lists" / "unions.csv"
NOW = datetime(2026, 1, 15, 10, 0, tzinfo=UTC)

MakeRenderer = Callable[..., Renderer]


def ann(**changes: Any) -> Recipient:
    values: dict[str, Any] = {
        "email": "ann@example.org",
        "line": 7,
        "name": "Ann Hart",
        "organization": "Branch 114",
    }
    values.update(changes)
    if "fields" in values:
        values["fields"] = MappingProxyType(values["fields"])
    return Recipient(**values)


@pytest.fixture
def make_renderer(tmp_path: Path) -> MakeRenderer:
    """Write templates into tmp_path and load one of them, `m` by default."""

    def make(
        files: Mapping[str, str],
        name: str = "m",
        context: dict[str, Any] | None = None,
        default_timezone: str = "Europe/London",
    ) -> Renderer:
        for filename, source in files.items():
            (tmp_path / filename).write_text(source, encoding="utf-8")
        return Renderer(
            tmp_path,
            name,
            campaign={
                "id": "karaganda-2003",
                "name": "Solidarity",
                "list_id": "karaganda.lists.example.org",
                "timezone": default_timezone,
                "context": context if context is not None else {},
            },
            sender={"name": "Solidarity Committee", "address": "appeal@example.org"},
            default_timezone=default_timezone,
            now=NOW,
        )

    return make


def render(renderer: Renderer, recipient: Recipient | None = None) -> Any:
    return renderer.render(
        recipient or ann(), unsubscribe_url="https://lists.example.org/u?t=tok", step="m"
    )


def render_error(renderer: Renderer, recipient: Recipient | None = None) -> TemplateError:
    with pytest.raises(TemplateError) as excinfo:
        render(renderer, recipient)
    return excinfo.value


def load_error(make_renderer: MakeRenderer, files: Mapping[str, str]) -> TemplateError:
    with pytest.raises(TemplateError) as excinfo:
        make_renderer(files)
    return excinfo.value


# -- the header block ----------------------------------------------------------------


def test_subject_and_body_are_rendered(make_renderer: MakeRenderer) -> None:
    """`Subject:` becomes the subject; the text after the blank line is the body."""
    renderer = make_renderer(
        {"m.txt.j2": "Subject: Hello {{ recipient.name }}\n\nDear {{ recipient.name }},\n"}
    )
    message = render(renderer)
    assert message.subject == "Hello Ann Hart"
    assert message.text == "Dear Ann Hart,\n"
    assert message.html is None
    assert message.recipient.email == "ann@example.org"


def test_header_name_is_case_insensitive(make_renderer: MakeRenderer) -> None:
    """`subject:` in lower case is the Subject."""
    renderer = make_renderer({"m.txt.j2": "subject: Quiet\n\nbody\n"})
    assert render(renderer).subject == "Quiet"


def test_missing_header_block_is_refused(make_renderer: MakeRenderer) -> None:
    """A template that starts with its body (no `Subject:`, no blank line) is refused on line 1."""
    error = load_error(make_renderer, {"m.txt.j2": "Dear {{ recipient.name }}, please fax.\n"})
    assert error.template == "m.txt.j2"
    assert error.line == 1
    assert "header block" in str(error)


def test_body_text_in_place_of_headers_is_refused(make_renderer: MakeRenderer) -> None:
    """A first paragraph that is not header lines is refused, naming the line."""
    error = load_error(make_renderer, {"m.txt.j2": "Dear friend,\n\nplease fax.\n"})
    assert error.line == 1
    assert "not a header line" in str(error)


def test_header_block_without_subject_is_refused(make_renderer: MakeRenderer) -> None:
    """A header block whose only line is a misspelt Subject is refused, naming that line."""
    error = load_error(make_renderer, {"m.txt.j2": "Subjekt: Hi\n\nbody\n"})
    assert error.template == "m.txt.j2"
    assert error.line == 1
    assert "Subjekt" in str(error)


@pytest.mark.parametrize("header", ["From", "To", "Bcc", "cc", "Reply-To", "X-Mailer"])
def test_other_headers_are_refused_with_their_line(
    make_renderer: MakeRenderer, header: str
) -> None:
    """A template sets only the Subject: From, To, Bcc and the rest are refused with the line."""
    error = load_error(
        make_renderer, {"m.txt.j2": f"Subject: Hi\n{header}: victim@example.com\n\nbody\n"}
    )
    assert error.template == "m.txt.j2"
    assert error.line == 2
    assert header in str(error)
    assert "m.txt.j2:2" in str(error)


def test_subject_set_twice_is_refused(make_renderer: MakeRenderer) -> None:
    """Two Subject lines are refused, naming the second."""
    error = load_error(make_renderer, {"m.txt.j2": "Subject: One\nSubject: Two\n\nbody\n"})
    assert error.line == 2
    assert "twice" in str(error)


@pytest.mark.parametrize("breaker", ["\n", "\r", "\r\n", "\u2028", "\x00"])
def test_subject_rendering_a_line_break_is_refused_naming_the_header_line(
    make_renderer: MakeRenderer, breaker: str
) -> None:
    """A Subject that renders with CR/LF (from a list column) is refused: no header injection."""
    renderer = make_renderer({"m.txt.j2": "Subject: Re: {{ recipient.topic }}\n\nbody\n"})
    recipient = ann(line=12, fields={"topic": f"fax{breaker}Bcc: victim@example.com"})
    error = render_error(renderer, recipient)
    assert error.template == "m.txt.j2"
    assert error.line == 1
    assert error.recipient_line == 12
    assert error.recipient == "ann@example.org"
    assert "Subject" in str(error)
    assert f"U+{ord(breaker[0]):04X}" in str(error)


def test_subject_empty_for_a_recipient_is_refused(make_renderer: MakeRenderer) -> None:
    """A Subject that renders empty for one recipient stops the run, naming that recipient."""
    renderer = make_renderer({"m.txt.j2": "Subject: {{ recipient.name }}\n\nbody\n"})
    assert render(renderer).subject == "Ann Hart"
    error = render_error(renderer, ann(name="", line=30, email="nameless@example.org"))
    assert error.recipient_line == 30
    assert error.recipient == "nameless@example.org"
    assert "empty" in str(error)


def test_crlf_template_is_read(make_renderer: MakeRenderer) -> None:
    """A template saved with Windows line endings has its header block recognised."""
    renderer = make_renderer({"m.txt.j2": "Subject: Hi\r\n\r\nline one\r\nline two\r\n"})
    message = render(renderer)
    assert message.subject == "Hi"
    assert message.text.splitlines() == ["line one", "line two"]


def test_missing_template_names_the_ones_available(make_renderer: MakeRenderer) -> None:
    """Asking for a template that does not exist lists the sendable ones (not partials)."""
    with pytest.raises(TemplateError) as excinfo:
        make_renderer(
            {"appeal.txt.j2": "Subject: A\n\nbody\n", "_footer.txt.j2": "--\n"}, name="apeal"
        )
    assert excinfo.value.template == "apeal.txt.j2"
    assert excinfo.value.hint is not None
    assert "appeal" in excinfo.value.hint
    assert "_footer" not in excinfo.value.hint


# -- errors name the template line and the recipient ---------------------------------


def test_variable_missing_for_one_recipient_names_template_line_and_recipient(
    make_renderer: MakeRenderer,
) -> None:
    """A column one recipient lacks stops rendering, naming file, line and list line."""
    renderer = make_renderer(
        {
            "m.txt.j2": "Subject: Hi\n\nDear {{ recipient.name }},\n\n"
            "Branch: {{ recipient.branch }}\n"
        }
    )
    ok = render(renderer, ann(fields={"branch": "114"}))
    assert "Branch: 114" in ok.text
    error = render_error(renderer, ann(line=41, email="tom@example.org", fields={}))
    assert error.template == "m.txt.j2"
    assert error.line == 5
    assert error.recipient_line == 41
    assert error.recipient == "tom@example.org"
    assert "m.txt.j2:5" in str(error)
    assert "list line 41" in str(error)
    assert "tom@example.org" in str(error)
    assert "branch" in str(error)
    assert error.hint is not None
    assert "nothing was sent" in error.hint


def test_variable_missing_in_the_subject_names_the_subject_line(
    make_renderer: MakeRenderer,
) -> None:
    """A variable missing in the Subject names the template, line 1, and the recipient."""
    renderer = make_renderer({"m.txt.j2": "Subject: For {{ recipient.branch }}\n\nbody\n"})
    error = render_error(renderer, ann(line=9))
    assert error.template == "m.txt.j2"
    assert error.line == 1
    assert error.recipient_line == 9
    assert "m.txt.j2:1" in str(error)


def test_missing_top_level_variable_is_an_error_not_empty_text(
    make_renderer: MakeRenderer,
) -> None:
    """A misspelt variable (`{{ recipent.name }}`) is an error, never rendered as empty."""
    renderer = make_renderer({"m.txt.j2": "Subject: Hi\n\nDear {{ recipent.name }},\n"})
    error = render_error(renderer)
    assert error.line == 3
    assert "recipent" in str(error)


def test_body_error_line_numbers_match_the_file(make_renderer: MakeRenderer) -> None:
    """Line numbers count the header block: an error on file line 11 is reported as line 11."""
    source = (
        "Subject: {{ campaign.context.title }}\n"  # 1
        "\n"  # 2
        "{#\n"  # 3
        "  a comment over\n"  # 4
        "  three lines\n"  # 5
        "#}\n"  # 6
        "{% for demand in campaign.context.demands %}\n"  # 7
        "  * {{ demand }}\n"  # 8
        "{% endfor %}\n"  # 9
        "\n"  # 10
        "Fax {{ campaign.context.court.fax }}\n"  # 11
    )
    renderer = make_renderer(
        {"m.txt.j2": source},
        context={"title": "Appeal", "demands": ["a", "b"], "court": {}},
    )
    error = render_error(renderer)
    assert error.template == "m.txt.j2"
    assert error.line == 11


def test_runtime_error_in_body_names_its_line(make_renderer: MakeRenderer) -> None:
    """A bad office-hours value reaching a helper is a TemplateError on the calling line."""
    renderer = make_renderer(
        {
            "m.txt.j2": "Subject: Hi\n\nOpen:\n"
            "{{ office_hours('Asia/Almaty', campaign.context.hours, recipient.timezone, now) }}\n"
        },
        context={"hours": "nine to six"},
    )
    error = render_error(renderer)
    assert error.line == 4
    assert "09:00-18:00" in str(error)


def test_syntax_error_reports_template_and_line(make_renderer: MakeRenderer) -> None:
    """A Jinja syntax error in the body is reported at load time with the file and line."""
    error = load_error(
        make_renderer,
        {"m.txt.j2": "Subject: Hi\n\nline 3\nline 4\n{% if recipient.name %}\nline 6\n"},
    )
    assert error.template == "m.txt.j2"
    assert error.line in {5, 6}  # Jinja reports an unclosed block where the file ends
    assert "syntax error" in str(error)
    error = load_error(make_renderer, {"m.txt.j2": "Subject: Hi\n\nline 3\n{{ 1 + }}\nline 5\n"})
    assert error.line == 4


def test_syntax_error_in_the_subject_reports_line_1(make_renderer: MakeRenderer) -> None:
    """A Jinja syntax error in the Subject names the Subject's line."""
    error = load_error(make_renderer, {"m.txt.j2": "Subject: {{ recipient.name\n\nbody\n"})
    assert error.template == "m.txt.j2"
    assert error.line == 1


@pytest.mark.parametrize("tag", ["extends", "include"])
def test_syntax_error_in_a_partial_names_the_partial(
    make_renderer: MakeRenderer, tag: str
) -> None:
    """A syntax error in an extended or included partial names that partial's file and line.

    Partials are loaded when rendering reaches them: that is still before anything is
    sent, since every message is rendered first.
    """
    renderer = make_renderer(
        {
            "m.txt.j2": f"Subject: Hi\n\nbody\n{{% {tag} '_base.txt.j2' %}}\n",
            "_base.txt.j2": "top\n{% block b %}\n{% endblok %}\n",
        }
    )
    error = render_error(renderer, ann(line=8))
    assert error.template == "_base.txt.j2"
    assert error.line == 3
    assert error.recipient_line == 8


# -- partials, inheritance, HTML -----------------------------------------------------


def test_include_of_a_footer_partial_works(make_renderer: MakeRenderer) -> None:
    """`{% include "_footer.txt.j2" %}` renders the partial with the same context."""
    renderer = make_renderer(
        {
            "m.txt.j2": "Subject: Hi\n\nBody.\n{% set personal = true %}\n"
            '{% include "_footer.txt.j2" %}',
            "_footer.txt.j2": "-- \n{% if personal %}\nLeave: {{ unsubscribe_url }}\n{% endif %}\n"
            "{{ sender.address }}\n",
        }
    )
    assert render(renderer).text == (
        "Body.\n-- \nLeave: https://lists.example.org/u?t=tok\nappeal@example.org\n"
    )


def test_error_inside_an_included_partial_names_the_partial(make_renderer: MakeRenderer) -> None:
    """A variable missing inside the footer names `_footer.txt.j2` and its line."""
    renderer = make_renderer(
        {
            "m.txt.j2": 'Subject: Hi\n\nBody.\n{% include "_footer.txt.j2" %}\n',
            "_footer.txt.j2": "-- \n\n{{ campaign.context.list_name }}\n",
        }
    )
    error = render_error(renderer, ann(line=3))
    assert error.template == "_footer.txt.j2"
    assert error.line == 3
    assert error.recipient_line == 3


def test_include_of_a_missing_partial_is_an_error(make_renderer: MakeRenderer) -> None:
    """Including a partial that does not exist is a TemplateError naming it."""
    renderer = make_renderer({"m.txt.j2": 'Subject: Hi\n\nBody.\n{% include "_nope.txt.j2" %}\n'})
    error = render_error(renderer)
    assert "_nope.txt.j2" in str(error)


def test_template_inheritance_from_a_base_partial_works(make_renderer: MakeRenderer) -> None:
    """A sendable template can extend a `_base` partial and fill its blocks."""
    renderer = make_renderer(
        {
            "m.txt.j2": 'Subject: Hi\n\n{% extends "_base.txt.j2" %}\n'
            "{% block letter %}\nDear {{ recipient.name }},\n{% endblock %}\n",
            "_base.txt.j2": "== {{ campaign.name }} ==\n{% block letter %}{% endblock %}\n"
            "In solidarity\n",
        }
    )
    assert render(renderer).text == "== Solidarity ==\nDear Ann Hart,\nIn solidarity\n"


def test_html_is_autoescaped_and_text_is_not(make_renderer: MakeRenderer) -> None:
    """A name `<b>` is `&lt;b&gt;` in the .html.j2 body and stays raw in text and Subject."""
    renderer = make_renderer(
        {
            "m.txt.j2": "Subject: For {{ recipient.name }}\n\nDear {{ recipient.name }},\n",
            "m.html.j2": "<p>Dear {{ recipient.name }},</p>\n",
        }
    )
    assert renderer.has_html
    message = render(renderer, ann(name='<b>Ann</b> & "Co"'))
    assert message.subject == 'For <b>Ann</b> & "Co"'
    assert message.text == 'Dear <b>Ann</b> & "Co",\n'
    assert message.html == "<p>Dear &lt;b&gt;Ann&lt;/b&gt; &amp; &#34;Co&#34;,</p>\n"


def test_html_template_has_no_header_block(make_renderer: MakeRenderer) -> None:
    """The .html.j2 body is all body: a first line that looks like a header is content."""
    renderer = make_renderer(
        {"m.txt.j2": "Subject: Hi\n\ntext\n", "m.html.j2": "Subject: <i>not a header</i>\n"}
    )
    assert render(renderer).html == "Subject: <i>not a header</i>\n"


def test_error_in_the_html_body_names_the_html_file(make_renderer: MakeRenderer) -> None:
    """A variable missing in the HTML body names the .html.j2 file and its line."""
    renderer = make_renderer(
        {"m.txt.j2": "Subject: Hi\n\ntext\n", "m.html.j2": "<p>\n{{ recipient.nickname }}\n</p>\n"}
    )
    error = render_error(renderer, ann(line=5))
    assert error.template == "m.html.j2"
    assert error.line == 2
    assert error.recipient_line == 5


# -- the sandbox ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "expression",
    [
        "''.__class__.__mro__",
        "recipient.__class__",
        "recipient.__class__.__mro__[1].__subclasses__()",
        "recipient | attr('__class__')",
        "'{0.__class__}'.format(recipient)",
        "campaign.context.__class__",
        "hours_ahead.__globals__",
    ],
)
def test_sandbox_refuses_access_to_internals(make_renderer: MakeRenderer, expression: str) -> None:
    """Unsafe attribute access raises TemplateError instead of rendering Python internals."""
    renderer = make_renderer({"m.txt.j2": f"Subject: Hi\n\n{{{{ {expression} }}}}\n"})
    error = render_error(renderer)
    assert error.line == 3
    assert "unsafe" in str(error).lower()


def test_sandbox_refuses_changing_shared_campaign_data(make_renderer: MakeRenderer) -> None:
    """A template cannot mutate campaign.context, so one recipient cannot alter the next's mail."""
    demands = ["free them"]
    renderer = make_renderer(
        {"m.txt.j2": "Subject: Hi\n\n{{ campaign.context.demands.append('x') }}\n"},
        context={"demands": demands},
    )
    error = render_error(renderer)
    assert error.line == 3
    assert demands == ["free them"]


def test_context_key_named_like_a_dict_method_wins(make_renderer: MakeRenderer) -> None:
    """`campaign.context.items` is the context's "items" value, not the dict method."""
    renderer = make_renderer(
        {
            "m.txt.j2": "Subject: {{ campaign.context.items }}\n\n"
            "{{ campaign.context.items }}/{{ campaign.context.keys }}/{{ campaign.context.get }}\n"
        },
        context={"items": "three leaflets", "keys": "k", "get": "g"},
    )
    message = render(renderer)
    assert message.subject == "three leaflets"
    assert message.text == "three leaflets/k/g\n"


def test_list_column_named_like_a_dict_method_wins(make_renderer: MakeRenderer) -> None:
    """A list column named `values` reaches templates as recipient.values."""
    renderer = make_renderer({"m.txt.j2": "Subject: Hi\n\n{{ recipient.values }}\n"})
    assert render(renderer, ann(fields={"values": "solidarity"})).text == "solidarity\n"


# -- the recipient in templates ------------------------------------------------------


def test_recipient_timezone_falls_back_to_the_campaign_timezone(
    make_renderer: MakeRenderer,
) -> None:
    """Without a list timezone, recipient.timezone is the campaign's; has_timezone tells which."""
    renderer = make_renderer(
        {"m.txt.j2": "Subject: Hi\n\n{{ recipient.timezone }} {{ recipient.has_timezone }}\n"},
        default_timezone="Europe/Dublin",
    )
    assert render(renderer, ann(timezone="")).text == "Europe/Dublin False\n"
    assert render(renderer, ann(timezone="Asia/Tokyo")).text == "Asia/Tokyo True\n"


def test_recipient_fields_line_and_extra_columns_reach_templates(
    make_renderer: MakeRenderer,
) -> None:
    """recipient.email, .organization, .language, .line and every extra column are available."""
    renderer = make_renderer(
        {
            "m.txt.j2": "Subject: Hi\n\n{{ recipient.email }}|{{ recipient.organization }}|"
            "{{ recipient.language }}|{{ recipient.line }}|{{ recipient.country }}\n"
        }
    )
    message = render(renderer, ann(language="kk", line=17, fields={"country": "KZ"}))
    assert message.text == "ann@example.org|Branch 114|kk|17|KZ\n"


def test_extra_column_with_newline_may_reach_the_body(make_renderer: MakeRenderer) -> None:
    """A multi-line note is fine in the body: only header values must be one line."""
    renderer = make_renderer({"m.txt.j2": "Subject: Hi\n\nNote:\n{{ recipient.note }}\n"})
    assert render(renderer, ann(fields={"note": "one\ntwo"})).text == "Note:\none\ntwo\n"


def test_time_zone_helpers_are_available_to_templates(make_renderer: MakeRenderer) -> None:
    """hours_ahead, office_hours and local_time work inside a template, using `now`."""
    renderer = make_renderer(
        {
            "m.txt.j2": "Subject: Hi\n\n"
            "{{ hours_ahead('Asia/Almaty', 'Europe/London', now) }}|"
            "{{ office_hours('Asia/Almaty', '09:00-18:00', recipient.timezone, now) }}|"
            "{{ now | local_time('Asia/Tokyo', '%H:%M') }}\n"
        }
    )
    assert render(renderer, ann(timezone="Europe/London")).text == "5|04:00\u201313:00|19:00\n"


# -- the shipped templates -----------------------------------------------------------


def example_renderer(name: str, now: datetime = NOW) -> Renderer:
    """A renderer for a shipped template, with the campaign of config.example.toml."""
    campaign = load_settings(EXAMPLE_CONFIG).campaign
    list_name, list_id = campaign.list_id_parts
    sender_name, sender_address = campaign.sender
    return Renderer(
        campaign.templates,
        name,
        campaign={
            "id": campaign.id,
            "name": list_name,
            "list_id": list_id,
            "timezone": campaign.timezone,
            "context": campaign.context,
        },
        sender={"name": sender_name, "address": sender_address},
        default_timezone=campaign.timezone,
        now=now,
    )


def example_recipients() -> list[Recipient]:
    items = list(read_recipients(EXAMPLE_LIST))
    people = [item for item in items if isinstance(item, Recipient)]
    assert len(people) == len(items) == 27
    return people


def personal_link(recipient: Recipient) -> str:
    return f"https://lists.example.org/unsubscribe?t=personal-token-{recipient.line}"


def test_shipped_appeal_is_the_same_for_everyone_and_holds_no_personal_data() -> None:
    """The forwardable appeal renders for every example row with no name, address or link in it."""
    renderer = example_renderer("appeal")
    messages = [
        renderer.render(r, unsubscribe_url=personal_link(r), step="appeal")
        for r in example_recipients()
    ]
    for message in messages:
        recipient = message.recipient
        for personal in (
            recipient.email,
            recipient.email.partition("@")[0],
            recipient.name,
            recipient.organization,
            personal_link(recipient),
            "personal-token",
        ):
            if personal:
                assert personal not in message.text, (recipient.line, personal)
                assert personal not in message.subject, (recipient.line, personal)
        assert message.html is None
        assert message.subject == "Kazakhstan: Urgent Appeal"
    # Nothing personal means nothing different: every copy is byte-identical.
    assert len({m.text for m in messages}) == 1


def test_shipped_appeal_gives_the_court_hours_in_london_time_by_season() -> None:
    """The appeal says Karaganda is 5 hours ahead of London in January and 4 in July."""
    [recipient, *_] = example_recipients()
    winter = example_renderer("appeal", datetime(2026, 1, 15, 10, tzinfo=UTC))
    summer = example_renderer("appeal", datetime(2026, 7, 15, 10, tzinfo=UTC))
    winter_text = " ".join(render(winter, recipient).text.split())
    summer_text = " ".join(render(summer, recipient).text.split())
    assert "Karaganda is 5 hours ahead of London time, so that is 04:00\u201313:00" in winter_text
    assert "Karaganda is 4 hours ahead of London time, so that is 05:00\u201314:00" in summer_text
    assert "+7 3212 742783" in winter_text


def test_shipped_protest_is_personal_in_text_and_html_for_every_row() -> None:
    """The protest call renders for every example row, signed with the name, with its own link."""
    renderer = example_renderer("protest")
    assert renderer.has_html
    for recipient in example_recipients():
        message = renderer.render(recipient, unsubscribe_url=personal_link(recipient), step="p")
        assert message.html is not None
        assert personal_link(recipient) in message.text
        assert personal_link(recipient) in message.html
        if recipient.name:
            assert recipient.name in message.subject
            assert recipient.name in message.text
        else:
            assert message.subject.startswith("Your protest letter")
            assert "[your name]" in message.text
        if recipient.organization:
            assert recipient.organization in message.text
        zone = recipient.timezone or "Europe/London"
        assert f"your time ({zone})" in " ".join(message.text.split())
        assert "\r" not in message.subject
        assert "\n" not in message.subject


def test_shipped_protest_shows_court_hours_in_the_subscribers_zone() -> None:
    """Tokyo reads 13:00-22:00; a row without a zone gets the campaign's (London) hours."""
    renderer = example_renderer("protest")
    people = {r.email: r for r in example_recipients()}
    tokyo = render(renderer, people["yamada.hanako@example.org"]).text
    assert "13:00\u201322:00 your time (Asia/Tokyo)" in " ".join(tokyo.split())
    no_zone = render(renderer, people["kwame.mensah@example.org"]).text
    assert "04:00\u201313:00 your time (Europe/London)" in " ".join(no_zone.split())


def test_shipped_reminder_renders_for_every_row() -> None:
    """The reminder renders for every example row with the fax, office hours and own link."""
    renderer = example_renderer("reminder")
    for recipient in example_recipients():
        message = renderer.render(recipient, unsubscribe_url=personal_link(recipient), step="r")
        assert "+7 3212 742783" in message.text
        assert personal_link(recipient) in message.text
        assert message.subject.endswith("reached the Karaganda court?")
        if recipient.name:
            assert message.subject.startswith(recipient.name)


# -- timezones -----------------------------------------------------------------------


def test_hours_ahead_follows_daylight_saving_time() -> None:
    """Almaty is 5 hours ahead of London in January and 4 in July (London's summer time)."""
    assert timezones.hours_ahead("Asia/Almaty", "Europe/London", datetime(2026, 1, 15)) == 5
    assert (
        timezones.hours_ahead("Asia/Almaty", "Europe/London", datetime(2026, 7, 15, tzinfo=UTC))
        == 4
    )


def test_hours_ahead_is_negative_behind_and_fractional_for_half_hour_zones() -> None:
    """London is -5 hours from Almaty in winter; Kolkata is 5.5 hours ahead of UTC."""
    at = datetime(2026, 1, 15, 12, tzinfo=UTC)
    assert timezones.hours_ahead("Europe/London", "Asia/Almaty", at) == -5
    assert timezones.hours_ahead("Asia/Kolkata", "UTC", at) == 5.5
    assert isinstance(timezones.hours_ahead("Asia/Almaty", "UTC", at), int)


def test_hours_ahead_changes_at_the_dst_switch_moment() -> None:
    """Just before 01:00 UTC on 29 March 2026 London is on GMT, just after on BST."""
    before = datetime(2026, 3, 29, 0, 59, tzinfo=UTC)
    after = datetime(2026, 3, 29, 1, 0, tzinfo=UTC)
    assert timezones.hours_ahead("Asia/Almaty", "Europe/London", before) == 5
    assert timezones.hours_ahead("Asia/Almaty", "Europe/London", after) == 4


@pytest.mark.parametrize(
    ("day", "expected"),
    [
        (date(2026, 3, 27), "04:00\u201313:00"),  # Friday before the change: GMT
        (date(2026, 3, 29), "05:00\u201314:00"),  # the change (01:00 UTC) is before opening
        (date(2026, 3, 30), "05:00\u201314:00"),  # BST
        (date(2026, 10, 24), "05:00\u201314:00"),  # last day of BST
        (date(2026, 10, 25), "04:00\u201313:00"),  # back to GMT (01:00 UTC) before opening
        (date(2026, 10, 26), "04:00\u201313:00"),
    ],
)
def test_office_hours_across_london_dst_changes(day: date, expected: str) -> None:
    """Almaty's 09:00-18:00 in London time moves by an hour on 2026-03-29 and 2026-10-25."""
    hours = timezones.office_hours("Asia/Almaty", "09:00-18:00", "Europe/London", day)
    assert str(hours) == expected
    assert hours.day_shift == 0
    assert hours.place_start.hour == 9
    assert hours.place_start.date() == day


def test_office_hours_spanning_the_dst_switch_itself() -> None:
    """Hours straddling London's spring change show the clock jump: 3 real hours, 00:00-04:00."""
    hours = timezones.office_hours(
        "Asia/Almaty", "05:00-08:00", "Europe/London", date(2026, 3, 29)
    )
    assert str(hours) == "00:00\u201304:00"
    assert hours.end.timestamp() - hours.start.timestamp() == 3 * 3600


def test_office_hours_of_london_seen_from_almaty_across_the_change() -> None:
    """London's 09:00-17:00 is 14:00-22:00 in Almaty on GMT days and 13:00-21:00 on BST days."""
    before = timezones.office_hours(
        "Europe/London", "09:00-17:00", "Asia/Almaty", date(2026, 3, 28)
    )
    after = timezones.office_hours(
        "Europe/London", "09:00-17:00", "Asia/Almaty", date(2026, 3, 30)
    )
    assert str(before) == "14:00\u201322:00"
    assert str(after) == "13:00\u201321:00"


def test_office_hours_where_the_day_changes_say_so() -> None:
    """Tokyo's 09:00-18:00 is 16:00-01:00 in Los Angeles: the evening before, ending next day."""
    hours = timezones.office_hours(
        "Asia/Tokyo", "09:00-18:00", "America/Los_Angeles", date(2026, 1, 15)
    )
    assert str(hours) == "16:00\u201301:00 (ending the next day)"
    assert hours.day_shift == -1
    assert hours.start.date() == date(2026, 1, 14)
    assert hours.end.date() == date(2026, 1, 15)


def test_office_hours_opening_on_the_next_local_day() -> None:
    """Los Angeles' 09:00-17:00 is already the next day in Tokyo (02:00-10:00)."""
    hours = timezones.office_hours(
        "America/Los_Angeles", "09:00-17:00", "Asia/Tokyo", date(2026, 1, 15)
    )
    assert str(hours) == "02:00\u201310:00"
    assert hours.day_shift == 1


def test_office_hours_day_is_the_places_day_for_a_datetime() -> None:
    """A datetime is first converted to the place's date: 22:00 UTC, 28 March is 29 March there."""
    hours = timezones.office_hours(
        "Asia/Almaty",
        "09:00-18:00",
        "Europe/London",
        datetime(2026, 3, 28, 22, 0, tzinfo=UTC),
    )
    assert hours.place_start.date() == date(2026, 3, 29)
    assert str(hours) == "05:00\u201314:00"


def test_office_hours_accept_an_en_dash() -> None:
    """Office hours written with an en dash (as in documents) are read like a hyphen."""
    hours = timezones.office_hours(
        "Asia/Almaty", "09:00\u201318:00", "Asia/Almaty", date(2026, 1, 5)
    )
    assert str(hours) == "09:00\u201318:00"


@pytest.mark.parametrize("text", ["9 to 5", "", "09:00", "09:00-", "25:00-26:00", "18:00-09:00"])
def test_bad_office_hours_string_raises_value_error(text: str) -> None:
    """Office hours that are not 'HH:MM-HH:MM' (opening before closing) raise ValueError."""
    with pytest.raises(ValueError, match="office hours"):
        timezones.office_hours("Asia/Almaty", text, "Europe/London", date(2026, 1, 15))


def test_local_time_converts_a_moment_to_a_zone() -> None:
    """local_time shows a UTC moment as wall-clock time in a zone, naive meaning UTC."""
    assert timezones.local_time(datetime(2026, 7, 1, 12, 0, tzinfo=UTC), "Europe/London") == (
        "2026-07-01 13:00"
    )
    assert timezones.local_time(datetime(2026, 1, 1, 23, 30), "Asia/Almaty", "%d %H:%M") == (
        "02 04:30"
    )


# -- wrapping ------------------------------------------------------------------------


def test_wordwrap_wraps_each_recipients_own_text_and_shared_text_alike(
    make_renderer: MakeRenderer,
) -> None:
    """`wordwrap` remembers wrapped texts, but each subscriber still gets their own paragraph.

    The shared paragraph wraps the same for everyone, exactly as Jinja's own
    filter wraps it; the personal one carries each name, never an earlier one.
    """
    shared = "The appeal hearing is on Monday and the court must hear from us. " * 4
    renderer = make_renderer(
        {
            "m.txt.j2": "Subject: S\n\n"
            "{% filter wordwrap(40, break_long_words=false) %}" + shared + "{% endfilter %}\n\n"
            "{{ (('Dear ' ~ recipient.name ~ ', please write today. ') * 3) | wordwrap(30) }}\n"
        }
    )
    jinja = jinja2.Environment(keep_trailing_newline=True, autoescape=False)  # noqa: S701  # plain text, as the .txt templates
    expected_shared = jinja.from_string(
        "{% filter wordwrap(40, break_long_words=false) %}" + shared + "{% endfilter %}"
    ).render()
    for name in ("Ann Hart", "Берик Абенов", "Ann Hart"):
        text = render(renderer, ann(name=name)).text
        assert text.startswith(expected_shared + "\n")
        assert all(len(line) <= 40 for line in expected_shared.splitlines())
        personal = text[len(expected_shared) + 1 :]
        assert personal == jinja.from_string(
            "{{ (('Dear ' ~ name ~ ', please write today. ') * 3) | wordwrap(30) }}\n"
        ).render(name=name)
        assert name in personal


# -- a message the same for everyone is rendered once ---------------------------------


def test_a_message_with_nothing_personal_is_rendered_once_and_shared(
    make_renderer: MakeRenderer,
) -> None:
    """A forwardable appeal (no recipient, no unsubscribe link) is one text for all.

    It is rendered once per run: every recipient's message carries the very same
    text object, equal to what rendering it for that recipient gives.
    """
    renderer = make_renderer(
        {"m.txt.j2": "Subject: {{ campaign.name }}\n\nFree the {{ campaign.id }} three.\n"}
    )
    first, second = render(renderer, ann()), render(renderer, ann(name="Берик"))
    assert first.text == "Free the karaganda-2003 three.\n"
    assert second.text is first.text
    assert (second.subject, second.recipient.name) == ("Solidarity", "Берик")


@pytest.mark.parametrize(
    "body",
    [
        "Dear {{ recipient.name }},",
        "{% if recipient.organization %}Comrades{% else %}Friend{% endif %}",
        "{{ recipient['name'] }}",
        "{{ recipient | length }} {{ recipient.items() | list }}",
        "{{ recipient | tojson }}",
        "{{ unsubscribe_url }}",
        "{{ unsubscribe_url[:30] }}",
        "{{ 'x' + unsubscribe_url }}",
        "{{ unsubscribe_url | tojson }}",
        "{{ unsubscribe_url | length }}",
        "{% if unsubscribe_url == 'x' %}a{% endif %}",
        "{% if 'name' in recipient %}{{ recipient.email }}{% endif %}",
        "{{ [recipient.name, 'x'] | join(', ') }}",
        "{{ range(100000) | random }}",
    ],
)
def test_a_message_that_uses_a_personal_value_is_rendered_per_recipient(
    make_renderer: MakeRenderer, body: str
) -> None:
    """Any use of `recipient` or `unsubscribe_url`, however indirect, makes the message personal.

    Each recipient's text is then what rendering for that recipient alone gives
    (two recipients who differ in every field, and `random` gives each its own).
    """
    renderer = make_renderer({"m.txt.j2": "Subject: S\n\n" + body + "\n"})
    people = [ann(), ann(email="berik@example.kz", name="Берик", organization="", line=9)]
    # Two recipients, and two unsubscribe URLs, that differ in every way a template can see.
    urls = ["x", "https://lists.example.org/unsubscribe?t=2"]
    texts = [
        renderer.render(person, unsubscribe_url=url, step="m").text
        for person, url in zip(people, urls, strict=True)
    ]
    if "random" in body:
        more = {render(renderer).text for _ in range(20)}
        assert len(more) > 1
        return
    assert texts[0] != texts[1]


def test_the_preflight_check_falls_back_when_a_shared_text_differs(
    make_renderer: MakeRenderer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Should the probe be fooled, the pre-flight comparison renders everyone on their own.

    A template compares the unsubscribe URL in a way the probe cannot see (a C
    method of another string); the first recipient's own render differs from
    the shared one, and from then on each recipient gets their own text.
    """
    renderer = make_renderer(
        {
            "m.txt.j2": "Subject: S\n\n"
            "{% if 'https://u.example/1'.endswith(unsubscribe_url) %}one{% else %}other"
            "{% endif %}\n"
        }
    )
    assert render(renderer).text == "other"  # shared: the probe saw nothing personal
    renderer.check(ann(), unsubscribe_url="https://u.example/1", step="m", index=0)
    got = renderer.render(ann(), unsubscribe_url="https://u.example/1", step="m").text
    assert got == "one"
