"""Render a template for one recipient: sandboxed Jinja2, a header block, then the body.

A sendable template, ``templates/NAME.txt.j2``, starts with header lines
(``Subject:`` required), a blank line, then the body. Each header value is a
template of its own, so a rendered value can be checked for line breaks before
it can become a header. Partials whose names start with ``_`` (a shared
footer, a base layout) have no header block. ``NAME.html.j2``, if present, is
the HTML body of a multipart/alternative message; it has no header block.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import re
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any

import jinja2
from jinja2.filters import do_wordwrap
from jinja2.sandbox import ImmutableSandboxedEnvironment

from appeal_mailer import links, timezones
from appeal_mailer.errors import TemplateError
from appeal_mailer.models import Recipient, RenderedMessage

TEXT_SUFFIX = ".txt.j2"
HTML_SUFFIX = ".html.j2"
# The one header a template sets. The others are the message's own (From, To,
# Message-ID, List-*: mime.py builds them from the config) and cannot be overridden.
ALLOWED_HEADERS = {"subject": "Subject"}
_HEADER_LINE = re.compile(r"^([A-Za-z][A-Za-z0-9-]*):[ \t]*(.*)$")
_HEADER_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


@dataclass(frozen=True)
class _HeaderSource:
    name: str
    line: int
    template: jinja2.Template


class _HeaderBlockLoader(jinja2.FileSystemLoader):
    """Gives Jinja the body of a sendable template, with its header block commented out.

    The header lines stay in the source inside a comment, so that line numbers in
    error messages match the file as the user sees it. With `language`, a template
    included by name ("_footer.txt.j2") is taken from that language's folder
    ("ru/_footer.txt.j2") when it has one, else from the default's.
    """

    def __init__(self, searchpath: str, language: str | None = None) -> None:
        super().__init__(searchpath)
        self._language = language

    def get_source(
        self, environment: jinja2.Environment, template: str
    ) -> tuple[str, str, Callable[[], bool]]:
        prefix = f"{self._language}/" if self._language else ""
        if prefix and not template.startswith(prefix):
            with contextlib.suppress(jinja2.TemplateNotFound):
                return self.get_source(environment, prefix + template)
        source, filename, uptodate = super().get_source(environment, template)
        if _is_sendable(template):
            head, body = split_header_block(source, template)
            if "#}" in head:
                raise TemplateError("'#}' is not allowed in a header line", template=template)
            source = "{#" + head + "#}" + body
        return source, filename, uptodate


def _is_sendable(template: str) -> bool:
    return template.endswith(TEXT_SUFFIX) and not Path(template).name.startswith("_")


def split_header_block(source: str, template: str) -> tuple[str, str]:
    """Split a template's source into its header block (with the blank line) and body."""
    head, sep, body = source.partition("\n\n")
    if not sep:
        head, sep, body = source.partition("\r\n\r\n")
    if not sep or not head.strip():
        raise TemplateError(
            "no header block: a template starts with 'Subject: ...', then a blank line, "
            "then the body",
            template=template,
            line=1,
        )
    return head + sep, body


class _Environment(ImmutableSandboxedEnvironment):
    """The sandbox, where `a.b` on a mapping means the key "b" first.

    Jinja tries the attribute first, so `context.items` would be the dict
    method rather than a context key named "items".
    """

    def getattr(self, obj: Any, attribute: str) -> Any:
        if isinstance(obj, Mapping) and attribute in obj:
            return obj[attribute]
        return super().getattr(obj, attribute)


_UNKNOWN = object()


class _PersonalValueUsed(Exception):
    """A template used `recipient` or `unsubscribe_url` (see Renderer._render_shared)."""


# Subscribers named per language in "no version in their language" (the rest counted).
_FELL_BACK_SHOWN = 5


class Languages:
    """A step's template in each language it has a version in, and the default for the rest.

    `templates/NAME.txt.j2` is the campaign's default language ([campaign]
    language); `templates/ru/NAME.txt.j2` is the Russian version, for subscribers
    whose `language` column says "ru" (or "ru-RU"). A subscriber whose language has
    no version gets the default, and `fell_back` counts them by language, for the
    run's report.
    """

    def __init__(
        self,
        directory: Path,
        name: str,
        *,
        fallbacks: Mapping[str, str] | None = None,
        **options: Any,
    ) -> None:
        self.default = Renderer(directory, name, **options)
        # A language with no version of its own to a related one that has ("kk" to
        # "ru": most Kazakh readers read Russian), before the default.
        self._fallbacks = {
            _language_key(wanted): _language_key(instead)
            for wanted, instead in (fallbacks or {}).items()
        }
        self.default_language = _language_key(options.get("default_language", "en"))
        self._versions = {
            _language_key(folder.name): Renderer(directory, name, language=folder.name, **options)
            for folder in sorted(directory.iterdir())
            if folder.is_dir() and (folder / (name + TEXT_SUFFIX)).is_file()
        }
        self.fell_back: collections.Counter[str] = collections.Counter()
        self.used: collections.Counter[str] = collections.Counter()
        # The first few who fell back, by language, for the report: who they are.
        self.fell_back_examples: dict[str, list[str]] = {}

    def reset(self) -> None:
        """Forget the counts (a pre-flight pass starting again)."""
        self.fell_back.clear()
        self.used.clear()
        self.fell_back_examples.clear()

    @property
    def versions(self) -> list[str]:
        return sorted(self._versions)

    def pick(self, recipient: Recipient, *, count: bool = False) -> Renderer:
        """The renderer for `recipient`'s language; `count` it (in the pre-flight pass)."""
        renderer, fell_back = self.choose(recipient)
        if count and fell_back is not None:
            self.fell_back[fell_back] += 1
            shown = self.fell_back_examples.setdefault(fell_back, [])
            if len(shown) < _FELL_BACK_SHOWN:
                shown.append(str(recipient))
        elif count and renderer is not self.default:
            # "ru", or "ru for kk" when it stands in for a language (fallback_languages).
            wanted = _language_key(recipient.language)
            version = renderer.language or ""
            own = self._version(wanted) is renderer
            self.used[version if own else f"{version} for {wanted}"] += 1
        return renderer

    def choose(self, recipient: Recipient) -> tuple[Renderer, str | None]:
        """The renderer for `recipient`, and the language they asked for if it has no version."""
        wanted = _language_key(recipient.language) or self.default_language
        found = self._version(wanted)
        if found is None:
            instead = self._fallbacks.get(wanted) or self._fallbacks.get(wanted.partition("-")[0])
            found = self._version(instead) if instead else None
        if found is not None and wanted != self.default_language:
            return found, None
        if wanted.partition("-")[0] != self.default_language.partition("-")[0]:
            return self.default, wanted
        return self.default, None

    def _version(self, language: str) -> Renderer | None:
        return self._versions.get(language) or self._versions.get(language.partition("-")[0])


def _language_key(language: str) -> str:
    # "ru_RU", "RU-ru" and "ru-RU" all mean the same language tag (BCP 47 is case-blind).
    return language.strip().lower().replace("_", "-")


def _refuse(*_args: Any, **_kwargs: Any) -> Any:
    raise _PersonalValueUsed


# What a stand-in must still do to be passed around: exist, be looked up, be typed.
_INERT = frozenset(
    {
        "__new__",
        "__init__",
        "__getattribute__",
        "__init_subclass__",
        "__subclasshook__",
        "__class__",
        "__setattr__",
        "__delattr__",
        "__dir__",
        "__sizeof__",
        "__reduce__",
        "__reduce_ex__",
        "__getstate__",
    }
)


def _stand_in(base: type) -> type:
    """A subclass of `base` (so type tests answer as for the real value) that raises on any use."""
    refused = {
        name: _refuse
        for name in dir(base)
        if name not in _INERT and callable(getattr(base, name, None))
    }
    return type(f"_Opaque{base.__name__.title()}", (base,), refused)


_OpaqueStr = _stand_in(str)
_OpaqueDict = _stand_in(dict)
# Some C code reads a str's or dict's contents without calling any method (`"a" +
# s`, str.join, json.dumps): the stand-ins hold this, and a probe whose output
# contains it used a personal value.
_MARKER = "amPersonal" + secrets.token_hex(16)
# Rendered per recipient as well during the pre-flight pass, to check the shared
# text: the first recipients, then one in this many.
_CHECK_FIRST, _CHECK_EVERY = 20, 500


# Distinct wrapped texts kept per run: the shared paragraphs of a campaign's
# templates, with room to spare; personal ones come and go.
_WRAP_CACHE = 512


def _cached_wordwrap(environment: jinja2.Environment) -> Callable[..., str]:
    """Jinja's `wordwrap` filter, remembering its recent results.

    Every subscriber's message wraps the same paragraphs (the appeal's text is the
    same for all), and wrapping (textwrap) was a quarter of a send's CPU. The filter
    is a pure function of its arguments, so the same text wraps once per run; a
    bounded cache keeps memory flat when paragraphs are personal.
    """

    @functools.lru_cache(maxsize=_WRAP_CACHE)
    def wrap(
        text: str,
        width: int = 79,
        break_long_words: bool = True,
        wrapstring: str | None = None,
        break_on_hyphens: bool = True,
    ) -> str:
        return do_wordwrap(
            environment, text, width, break_long_words, wrapstring, break_on_hyphens
        )

    def wordwrap(
        value: Any,
        width: int = 79,
        break_long_words: bool = True,
        wrapstring: str | None = None,
        break_on_hyphens: bool = True,
    ) -> str:
        # str(): a Markup and a str of the same text wrap alike (do_wordwrap returns str).
        return wrap(str(value), width, break_long_words, wrapstring, break_on_hyphens)

    return wordwrap


class Renderer:
    """Renders one campaign step's template for each recipient; loaded once per run.

    With `language`, the template is that language's version in its folder
    (`templates/ru/protest.txt.j2`, and `protest.html.j2` only from there too).
    """

    def __init__(
        self,
        directory: Path,
        name: str,
        *,
        campaign: Mapping[str, Any],
        sender: Mapping[str, str],
        default_timezone: str,
        default_language: str = "en",
        now: datetime,
        language: str | None = None,
    ) -> None:
        self.language = language
        self.name = f"{language}/{name}" if language else name
        self.text_name = self.name + TEXT_SUFFIX
        self._default_timezone = default_timezone
        self._default_language = default_language
        self._env = _Environment(
            loader=_HeaderBlockLoader(str(directory), language),
            undefined=jinja2.StrictUndefined,
            autoescape=lambda template: bool(template and template.endswith(HTML_SUFFIX)),
            keep_trailing_newline=True,
            # Templates do not change during a run: no stat() of each file per render.
            auto_reload=False,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self._env.globals.update(
            hours_ahead=timezones.hours_ahead,
            office_hours=timezones.office_hours,
            local_time=timezones.local_time,
            mailto=links.mailto,
        )
        self._env.filters["local_time"] = timezones.local_time
        self._env.filters["wordwrap"] = _cached_wordwrap(self._env)
        self._base_context = {"campaign": campaign, "sender": sender, "now": now}
        self._headers, self._text = self._load_text(directory)
        self._html = self._load_html(directory)
        # (subject, text, html) when the message is the same for every recipient
        # (see _render_shared); None when it is personal; _UNKNOWN until first asked.
        self._shared: tuple[str, str, str | None] | object | None = _UNKNOWN

    @property
    def has_html(self) -> bool:
        return self._html is not None

    def render(self, recipient: Recipient, *, unsubscribe_url: str, step: str) -> RenderedMessage:
        """Render the message for `recipient`, or raise TemplateError naming its list line."""
        if self._shared is _UNKNOWN:
            self._shared = self._render_shared()
        if isinstance(self._shared, tuple):
            subject, text, html = self._shared
            return RenderedMessage(recipient, step, subject, text, html)
        context = {
            **self._base_context,
            "recipient": self._recipient_context(recipient),
            "unsubscribe_url": unsubscribe_url,
        }
        subject = ""
        for header in self._headers:
            value = self._run(
                header.template, context, recipient, self.text_name, line=header.line
            ).strip()
            bad = _HEADER_UNSAFE.search(value)
            if bad:
                raise TemplateError(
                    f"the {header.name} header would contain the control character "
                    f"U+{ord(bad.group()):04X}; a header is one line",
                    template=self.text_name,
                    line=header.line,
                    recipient_line=recipient.line,
                    recipient=recipient.email,
                )
            if not value:
                raise TemplateError(
                    f"the {header.name} is empty",
                    template=self.text_name,
                    line=header.line,
                    recipient_line=recipient.line,
                    recipient=recipient.email,
                )
            subject = value
        text = self._run(self._text, context, recipient, self.text_name)
        html = None
        if self._html is not None:
            html = self._run(self._html, context, recipient, self.name + HTML_SUFFIX)
        return RenderedMessage(
            recipient=recipient,
            step=step,
            subject=subject,
            text=text,
            html=html,
        )

    def _render_shared(self) -> tuple[str, str, str | None] | None:
        """The message, if it is the same for every recipient; else None.

        A forwardable appeal holds nothing personal, and rendering the same text for
        each of 20,000 subscribers was most of a send's CPU. Whether a template is
        personal cannot be read from its source (Jinja resolves every name a
        template mentions, used or not, and a branch decides what is used), so it is
        rendered once with stand-ins for the personal values (`recipient`,
        `unsubscribe_url`) that raise on any use: reading, printing, comparing,
        testing their length or truth. If the render succeeds, nothing in it
        depended on them; `campaign`, `sender` and `now` are the same for the whole
        run. `random` and `lipsum` would make the one text everyone's, so they count
        as personal. Any failure (a personal value used, or an error that the
        recipient's own render will then report with its line) means: render per
        recipient.
        """
        context = {
            **self._base_context,
            "recipient": _OpaqueDict({_MARKER: _MARKER}),
            "unsubscribe_url": _OpaqueStr(_MARKER),
        }
        saved_filter, saved_global = self._env.filters["random"], self._env.globals["lipsum"]
        self._env.filters["random"] = self._env.globals["lipsum"] = _refuse
        try:
            subjects = [header.template.render(context).strip() for header in self._headers]
            text = self._text.render(context)
            html = None if self._html is None else self._html.render(context)
        except Exception:  # any failure: render per recipient (see above)
            return None
        finally:
            self._env.filters["random"], self._env.globals["lipsum"] = saved_filter, saved_global
        subject = subjects[-1]
        if any(_MARKER in part for part in (subject, text, html or "")):
            return None
        if not subject or _HEADER_UNSAFE.search(subject):
            return None  # refused per recipient, with the recipient's line
        return subject, text, html

    def check(self, recipient: Recipient, *, unsubscribe_url: str, step: str, index: int) -> bool:
        """Pre-flight: render the `index`th recipient's message, or raise TemplateError.

        When the message is shared, some recipients' messages are also rendered
        on their own and compared with it: should one differ (a template that
        used a personal value in a way the probe could not see), every message
        is rendered per recipient from then on, and this returns True: the
        recipients checked before against the shared text must be checked again.
        """
        shared = self.render(recipient, unsubscribe_url=unsubscribe_url, step=step)
        if not isinstance(self._shared, tuple):
            return False
        if index >= _CHECK_FIRST and index % _CHECK_EVERY:
            return False
        self._shared, kept = None, self._shared
        own = self.render(recipient, unsubscribe_url=unsubscribe_url, step=step)
        if (own.subject, own.text, own.html) == (shared.subject, shared.text, shared.html):
            self._shared = kept
            return False
        return True

    def _recipient_context(self, recipient: Recipient) -> dict[str, Any]:
        return {
            **recipient.fields,
            "email": recipient.email,
            "name": recipient.name,
            "organization": recipient.organization,
            # The subscriber's language, else the campaign's.
            "language": recipient.language or self._default_language,
            # The subscriber's own zone, else the campaign's: templates need not care.
            "timezone": recipient.timezone or self._default_timezone,
            "has_timezone": bool(recipient.timezone),
            "line": recipient.line,
        }

    def _load_text(self, directory: Path) -> tuple[list[_HeaderSource], jinja2.Template]:
        path = directory / self.text_name
        try:
            source = path.read_text(encoding="utf-8-sig")
        except FileNotFoundError:
            available = sorted(
                p.name.removesuffix(TEXT_SUFFIX)
                for p in directory.glob("*" + TEXT_SUFFIX)
                if not p.name.startswith("_")
            )
            raise TemplateError(
                f"no such template in {directory}",
                template=self.text_name,
                hint="templates here: " + (", ".join(available) or "none"),
            ) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise TemplateError(f"cannot read: {exc}", template=self.text_name) from exc
        head, _ = split_header_block(source, self.text_name)
        headers = self._parse_headers(head)
        text = self._load(self.text_name)
        return headers, text

    def _parse_headers(self, head: str) -> list[_HeaderSource]:
        headers: list[_HeaderSource] = []
        for number, line in enumerate(head.splitlines(), start=1):
            if not line.strip():
                continue
            match = _HEADER_LINE.match(line)
            if match is None:
                raise TemplateError(
                    f"not a header line: {line!r} (a header block ends at the first blank line)",
                    template=self.text_name,
                    line=number,
                )
            name = ALLOWED_HEADERS.get(match.group(1).lower())
            if name is None:
                raise TemplateError(
                    f"a template cannot set {match.group(1)}: only Subject (From, Reply-To "
                    "and the rest come from the [campaign] settings)",
                    template=self.text_name,
                    line=number,
                )
            if any(h.name == name for h in headers):
                raise TemplateError(f"{name} is set twice", template=self.text_name, line=number)
            try:
                compiled = self._env.from_string(match.group(2))
            except jinja2.TemplateSyntaxError as exc:
                raise TemplateError(
                    f"syntax error: {exc.message}", template=self.text_name, line=number
                ) from exc
            headers.append(_HeaderSource(name, number, compiled))
        if not any(h.name == "Subject" for h in headers):
            raise TemplateError(
                "the header block has no Subject:", template=self.text_name, line=1
            )
        return headers

    def _load_html(self, directory: Path) -> jinja2.Template | None:
        if not (directory / (self.name + HTML_SUFFIX)).is_file():
            return None
        return self._load(self.name + HTML_SUFFIX)

    def _load(self, name: str) -> jinja2.Template:
        try:
            return self._env.get_template(name)
        except jinja2.TemplateSyntaxError as exc:
            raise TemplateError(
                f"syntax error: {exc.message}", template=exc.name or name, line=exc.lineno
            ) from exc
        except jinja2.TemplateNotFound as exc:
            raise TemplateError(
                f"includes a missing template {exc.name!r}", template=name
            ) from exc

    def _run(
        self,
        template: jinja2.Template,
        context: dict[str, Any],
        recipient: Recipient,
        name: str,
        *,
        line: int | None = None,
    ) -> str:
        try:
            return template.render(context)
        except TemplateError:
            raise
        except (jinja2.TemplateError, ValueError, LookupError, TypeError, ArithmeticError) as exc:
            where, line = _template_position(exc.__traceback__, name, line, self.language)
            message = exc.message if isinstance(exc, jinja2.TemplateError) else str(exc)
            raise TemplateError(
                f"{type(exc).__name__}: {message}",
                template=where,
                line=line,
                recipient_line=recipient.line,
                recipient=recipient.email,
                hint="every message is rendered before the first is sent: nothing was sent",
            ) from exc


def _template_position(
    tb: TracebackType | None,
    default: str,
    header_line: int | None = None,
    language: str | None = None,
) -> tuple[str, int | None]:
    # Jinja rewrites tracebacks so that template frames carry the template's file
    # name and line: the innermost such frame is where rendering failed.
    # A header value is compiled from a string ("<template>"): its line is the
    # header's line in the file, which the caller knows.
    where, line = default, header_line
    while tb is not None:
        filename = tb.tb_frame.f_code.co_filename
        if filename.endswith(".j2"):
            path = Path(filename)
            # A language version is named with its folder ("ru/appeal.txt.j2"), so the
            # error does not send the reader to the default language's file.
            named = language is not None and path.parent.name == language
            where = f"{language}/{path.name}" if named else path.name
            line = tb.tb_lineno
        elif filename == "<template>":
            line = header_line
        tb = tb.tb_next
    return where, line
