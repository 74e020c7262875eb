"""Each subscriber gets the template in their language, else the default, and the run says so.

Also the protest-call tooling that templates use: `mailto()` links (RFC 6068)
that must round-trip through `urllib.parse` to the exact letter.
"""

# Russian text is what these tests are about, so its Latin look-alikes are meant:
# ruff: noqa: RUF001

from __future__ import annotations

import html
import re
import shutil
from datetime import UTC, datetime
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from types import MappingProxyType
from urllib.parse import parse_qs, unquote, urlsplit
from urllib.parse import quote as urllib_quote

import pytest
from hypothesis import given
from hypothesis import strategies as st
from markupsafe import Markup

from appeal_mailer.errors import TemplateError
from appeal_mailer.links import mailto, quote
from appeal_mailer.models import Recipient
from appeal_mailer.render import Languages
from tests.conftest import TEMPLATES, CliRun, ConfigWriter, ListWriter
from tests.smtpd import RecordingServer
from tests.test_delivery import send

OPTIONS = {
    "campaign": {"id": "c", "name": "List", "list_id": "l.example.org", "context": {}},
    "sender": {"name": "Committee", "address": "appeal@example.org"},
    "default_timezone": "Europe/London",
    "default_language": "en",
    "now": datetime(2026, 12, 1, 12, tzinfo=UTC),
}


def person(language: str, email: str = "a@example.org") -> Recipient:
    return Recipient(email, 2, "Anna", language=language, fields=MappingProxyType({}))


@pytest.fixture
def templates(tmp_path: Path) -> Path:
    """A default `hello` with a footer, a Russian version with its own footer, a German one."""
    folder = tmp_path / "templates"
    (folder / "ru").mkdir(parents=True)
    (folder / "de").mkdir()
    (folder / "hello.txt.j2").write_text(
        "Subject: Hello\n\nHello {{ recipient.name }}\n{% include '_footer.txt.j2' %}",
        encoding="utf-8",
    )
    (folder / "_footer.txt.j2").write_text("-- the list\n", encoding="utf-8")
    (folder / "ru" / "hello.txt.j2").write_text(
        "Subject: Здравствуйте\n\nЗдравствуйте, {{ recipient.name }}\n"
        "{% include '_footer.txt.j2' %}",
        encoding="utf-8",
    )
    (folder / "ru" / "_footer.txt.j2").write_text("-- рассылка\n", encoding="utf-8")
    # German has a version, but no footer of its own: it includes the default's.
    (folder / "de" / "hello.txt.j2").write_text(
        "Subject: Hallo\n\nHallo {{ recipient.name }}\n{% include '_footer.txt.j2' %}",
        encoding="utf-8",
    )
    return folder


def rendered(languages: Languages, recipient: Recipient) -> tuple[str, str]:
    message = languages.pick(recipient, count=True).render(
        recipient, unsubscribe_url="https://example.org/u", step="hello"
    )
    return message.subject, message.text


def test_each_subscriber_gets_their_languages_version_with_its_own_includes(
    templates: Path,
) -> None:
    """ru (any case, with a region) -> ru/ with ru/_footer; de -> de/ with the default footer."""
    languages = Languages(templates, "hello", **OPTIONS)
    assert languages.versions == ["de", "ru"]
    assert rendered(languages, person("ru")) == (
        "Здравствуйте",
        "Здравствуйте, Anna\n-- рассылка\n",
    )
    assert rendered(languages, person("RU_ru"))[0] == "Здравствуйте"
    assert rendered(languages, person("de-AT")) == ("Hallo", "Hallo Anna\n-- the list\n")
    assert rendered(languages, person("")) == ("Hello", "Hello Anna\n-- the list\n")
    assert rendered(languages, person("en-GB"))[0] == "Hello"
    assert languages.used == {"ru": 2, "de": 1}
    assert languages.fell_back == {}


def test_a_language_without_a_version_gets_the_default_and_is_counted(templates: Path) -> None:
    """kk has no folder: the default text, and the report's count says so, by language."""
    languages = Languages(templates, "hello", **OPTIONS)
    assert rendered(languages, person("kk"))[0] == "Hello"
    assert rendered(languages, person("kk", "b@example.org"))[0] == "Hello"
    assert rendered(languages, person("ja"))[0] == "Hello"
    assert languages.fell_back == {"kk": 2, "ja": 1}


def test_an_html_part_comes_only_from_the_languages_own_folder(templates: Path) -> None:
    """A Russian text never travels with the default's English HTML part."""
    (templates / "hello.html.j2").write_text("<p>Hello</p>", encoding="utf-8")
    languages = Languages(templates, "hello", **OPTIONS)
    assert languages.pick(person("ru")).has_html is False
    assert languages.pick(person("")).has_html is True


def test_send_reports_who_got_which_language_and_who_fell_back(
    run_cli: CliRun,
    write_config: ConfigWriter,
    write_list: ListWriter,
    smtp_server: RecordingServer,
    tmp_path: Path,
) -> None:
    """End to end: the summary names the versions used and the languages that had none."""
    folder = tmp_path / "templates"
    shutil.copytree(TEMPLATES, folder, ignore=shutil.ignore_patterns("ru", "??"))
    (folder / "ru").mkdir(exist_ok=True)
    (folder / "ru" / "appeal.txt.j2").write_text(
        "Subject: Срочный призыв\n\n{{ campaign.context.slogan }}\n", encoding="utf-8"
    )
    config = write_config(campaign={"templates": str(folder)})
    rows = [
        {"email": "anna@example.org", "name": "Anna", "language": "ru"},
        {"email": "aigerim@example.org", "name": "Aigerim", "language": "kk"},
        {"email": "tom@example.org", "name": "Tom", "language": "en"},
    ]
    result = send(run_cli, write_list(rows), config)
    assert result.exit_code == 0, result.output
    assert "In their own language: 1 ru" in result.output
    assert "No version in their language, given the default: 1 kk" in result.output
    assert "  kk: Aigerim <aigerim@example.org>" in result.output  # who, by name
    subjects = {
        message.rcpt_tos[0]: message_from_bytes(message.data, policy=policy.default)["Subject"]
        for message in smtp_server.messages
    }
    assert subjects["anna@example.org"] == "Срочный призыв"
    assert subjects["aigerim@example.org"] == subjects["tom@example.org"] != "Срочный призыв"


# -- mailto: links (RFC 6068) ------------------------------------------------------------


def parse(link: str) -> tuple[list[str], dict[str, list[str]]]:
    """What a mail program reads from the link: the addressees and each header field."""
    parts = urlsplit(link)
    assert parts.scheme == "mailto"
    return [unquote(a) for a in parts.path.split(",")], parse_qs(parts.query, strict_parsing=True)


def test_a_mailto_link_carries_the_letter_subject_and_copy_exactly() -> None:
    """Spaces, "&", "=", "?", "#", "%", "+", non-ASCII and line breaks all survive the trip."""
    letter = "Dear President,\n\n50% + 1 & more = justice? #free\nСвободу Сакену!\n"
    link = mailto(
        "court@example.kz", subject="Protest: Zhanusov & Mingazov", body=letter, cc="c@example.net"
    )
    assert " " not in link
    assert "\n" not in link
    to, fields = parse(link)
    assert to == ["court@example.kz"]
    assert fields["cc"] == ["c@example.net"]
    assert fields["subject"] == ["Protest: Zhanusov & Mingazov"]
    # RFC 6068 5: line breaks in a body are CRLF, percent-encoded.
    assert fields["body"] == [letter.replace("\n", "\r\n")]
    assert "%0D%0A" in link


def test_html_captured_text_is_unescaped_before_it_is_encoded() -> None:
    """A letter captured in an HTML template is Markup ("&amp;"); the link carries "&"."""
    link = mailto("court@example.kz", body=Markup("Smith &amp; Sons"))
    assert parse(link)[1]["body"] == ["Smith & Sons"]


@given(
    body=st.text(st.characters(exclude_categories=["Cs"]), min_size=1),
    subject=st.text(st.characters(exclude_categories=["Cs", "Cc"]), min_size=1),
)
def test_any_letter_round_trips_through_urllib(body: str, subject: str) -> None:
    """Property: whatever the text, parse_qs gives back the subject and the CRLF body."""
    _, fields = parse(mailto("court@example.kz", subject=subject, body=body))
    normalized = body.replace("\r\n", "\n").replace("\r", "\n").replace("\n", "\r\n")
    assert fields["subject"] == [subject]
    assert fields["body"] == [normalized]


@given(st.lists(st.text(st.characters(exclude_categories=["Cs"])), min_size=1, max_size=6))
def test_a_letter_encoded_line_by_line_is_the_whole_letter_encoded(lines: list[str]) -> None:
    """Property: mailto() encodes (and remembers) lines; the URI is urllib's, whole, all the same.

    Each letter is linked twice, as the text and HTML parts do, so the second
    time every line comes from the cache.
    """
    body = "\n".join(lines)
    whole = "\r\n".join(body.replace("\r\n", "\n").replace("\r", "\n").split("\n"))
    query = "?body=" + urllib_quote(whole, safe="") if body else ""  # no body, no field
    expected = "mailto:court@example.kz" + query
    assert mailto("court@example.kz", body=body) == expected
    assert mailto("court@example.kz", body=body) == expected


def test_the_protest_links_to_its_own_letter_addressed_to_the_court(
    run_cli: CliRun, write_list: ListWriter, smtp_server: RecordingServer, config_file: Path
) -> None:
    """The shipped protest: the link in both parts opens exactly the letter in the message."""
    rows = [
        {"email": "anna@example.org", "name": "Anna Smith", "organization": "Smith & Sons Union"}
    ]
    result = run_cli("send", str(write_list(rows)), "--template", "protest", "--yes")
    assert result.exit_code == 0, result.output
    [received] = smtp_server.messages
    message = message_from_bytes(received.data, policy=policy.default)
    assert isinstance(message, EmailMessage)
    text_part, html_part = message.get_body(("plain",)), message.get_body(("html",))
    assert text_part is not None
    assert html_part is not None
    # Lines as a reader sees them (the wire's CRLF is kept by get_content()).
    text = text_part.get_content().replace("\r\n", "\n")
    page = html_part.get_content()
    text_link = re.search(r"^mailto:priemnaya\S+$", text, re.MULTILINE)
    html_link = re.search(r'href="(mailto:priemnaya[^"]+)"', page)
    assert text_link is not None
    assert html_link is not None
    for link in (text_link.group(), html.unescape(html_link.group(1))):
        to, fields = parse(link)
        assert to == ["priemnaya@oblsud-karaganda.example"]
        assert fields["cc"] == ["copies@example.net"]
        letter = fields["body"][0].replace("\r\n", "\n")
        assert letter.startswith("To: Court President")
        assert letter.rstrip().endswith("Anna Smith\nSmith & Sons Union")
    # The text part's link holds the very letter printed above it.
    letter = parse(text_link.group())[1]["body"][0].replace("\r\n", "\n")
    assert letter.strip() in text


@pytest.mark.parametrize("template", ["appeal", "protest", "reminder"])
def test_the_shipped_russian_versions_render_in_russian_for_ru_subscribers(
    run_cli: CliRun, write_list: ListWriter, smtp_server: RecordingServer, template: str
) -> None:
    """templates/ru: Russian subject and text, no English left, lines of 72, hours in Russian.

    A subscriber in Los Angeles sees the court's hours end the next day: said in
    Russian too, not with the English helper's words.
    """
    rows = [
        {"email": "sergey@example.org", "name": "Сергей Волков", "organization": "Профсоюз",
         "language": "ru", "timezone": "Europe/Moscow"},
        {"email": "olga@example.org", "name": "Ольга", "organization": "",
         "language": "ru-RU", "timezone": "America/Los_Angeles"},
        {"email": "tom@example.org", "name": "Tom", "organization": "Branch 7",
         "language": "en", "timezone": "Europe/London"},
    ]  # fmt: skip
    result = run_cli("send", str(write_list(rows)), "--template", template, "--yes")
    assert result.exit_code == 0, result.output
    assert "In their own language: 2 ru" in result.output
    by_recipient = {
        m.rcpt_tos[0]: message_from_bytes(m.data, policy=policy.default)
        for m in smtp_server.messages
    }
    english = by_recipient["tom@example.org"]
    assert not re.search("[а-яё]", str(english["Subject"]), re.IGNORECASE)
    for email in ("sergey@example.org", "olga@example.org"):
        message = by_recipient[email]
        assert isinstance(message, EmailMessage)
        assert re.search("[а-яё]", str(message["Subject"]), re.IGNORECASE)
        part = message.get_body(("plain",))
        assert part is not None
        text = part.get_content().replace("\r\n", "\n")
        for leftover in ("Dear ", "Court President", "ending the next day", "Yours sincerely"):
            assert leftover not in text, f"{email}: English left: {leftover!r}"
        long_lines = [
            line for line in text.splitlines() if len(line) > 72 and "mailto:" not in line
        ]
        assert long_lines == [], long_lines
    olga = by_recipient["olga@example.org"].get_body(("plain",))
    assert olga is not None
    if template != "appeal":  # the appeal is everyone's, in the court's and London's time
        assert "следующего дня" in olga.get_content()


def test_a_folder_named_with_an_underscore_serves_the_hyphenated_tag(templates: Path) -> None:
    """templates/pt_BR/ is the version for "pt-BR", "pt_br" and "PT-br" alike."""
    (templates / "pt_BR").mkdir()
    (templates / "pt_BR" / "hello.txt.j2").write_text("Subject: Olá\n\nOlá\n", encoding="utf-8")
    languages = Languages(templates, "hello", **OPTIONS)
    assert rendered(languages, person("pt-BR"))[0] == "Olá"
    assert rendered(languages, person("pt_br"))[0] == "Olá"
    assert languages.fell_back == {}


def test_an_error_in_a_language_version_names_that_version(templates: Path) -> None:
    """A missing variable in ru/hello.txt.j2 is reported there, not in the default's file."""
    (templates / "ru" / "hello.txt.j2").write_text(
        "Subject: Здравствуйте\n\nЗдравствуйте, {{ recipient.nickname }}\n", encoding="utf-8"
    )
    languages = Languages(templates, "hello", **OPTIONS)
    with pytest.raises(TemplateError) as caught:
        rendered(languages, person("ru"))
    assert caught.value.template == "ru/hello.txt.j2"
    assert caught.value.line == 3


def test_mailto_takes_several_addresses_and_refuses_a_display_name() -> None:
    """ "a, b" is two addressees; "Court <court@x>" is not an addr-spec (RFC 6068 2)."""
    to, fields = parse(mailto("court@example.kz, office@example.kz", cc=["a@x.org", "b@y.org"]))
    assert to == ["court@example.kz", "office@example.kz"]
    assert fields["cc"] == ["a@x.org,b@y.org"]
    with pytest.raises(ValueError, match="bare addresses"):
        mailto("Court <court@example.kz>")
    # An "@" inside a quoted local part is encoded; the last one separates.
    assert mailto('"not@me"@example.org') == "mailto:%22not%40me%22@example.org"


@given(st.text(st.characters(exclude_categories=["Cs"])))
def test_the_fast_percent_encoding_is_urllibs(text: str) -> None:
    """links.quote() gives exactly urllib.parse.quote(text, safe="") for any text."""
    assert quote(text) == urllib_quote(text, safe="")


def test_a_language_without_a_version_can_fall_back_to_a_related_one(templates: Path) -> None:
    """fallback_languages = {kk = "ru"}: Kazakh readers get the Russian version, and it says so."""
    languages = Languages(templates, "hello", fallbacks={"kk": "ru"}, **OPTIONS)
    assert rendered(languages, person("kk"))[0] == "Здравствуйте"
    assert rendered(languages, person("kk-KZ"))[0] == "Здравствуйте"
    assert rendered(languages, person("ru"))[0] == "Здравствуйте"
    assert rendered(languages, person("ja"))[0] == "Hello"
    assert languages.used == {"ru for kk": 1, "ru for kk-kz": 1, "ru": 1}
    assert languages.fell_back == {"ja": 1}
