"""Does an HTML page load anything from the network? The one parser of every test that checks an
offline page (the report, the `dvc plots` template and the pages `dvc plots show/diff` write).

It collects the URLs a browser would fetch or follow: those of attributes (src, href, srcset, ...,
and a meta refresh), CSS `url(...)` and `@import` (in <style> and style attributes), and the
quoted absolute URLs of inline scripts (what fetch(), import() or a loader would be given)."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from urllib.parse import urlparse

URL_ATTRIBUTES = ("src", "href", "data", "srcset", "poster", "background", "xlink:href", "action", "formaction")
CSS_URL = re.compile(r"""url\(\s*(["']?)(.*?)\1\s*\)|@import\s+(["'])(.*?)\3""", re.IGNORECASE)
# An absolute or scheme-relative URL that opens a string literal ("...", '...', `...`).
SCRIPT_URL = re.compile(r"""["'`]((?:[a-z][a-z0-9+.-]*:)?//[^\s"'`\\]+)""", re.IGNORECASE)
META_REFRESH_URL = re.compile(r"url\s*=\s*['\"]?([^'\";]+)", re.IGNORECASE)
# Strings of the inlined plotting libraries (vega, vega-lite, vega-embed) that no page fetches: XML
# namespace names, the $schema id of a Vega spec and the "Open in Vega Editor" link (followed only
# on a click).
NOT_FETCHED = ("http://www.w3.org/", "https://vega.github.io/schema/", "https://vega.github.io/editor/")


class PageReferences(HTMLParser):
    """The URLs of a page: `attributes` (in document order, srcset split into its URLs), `css`
    (url(...) and @import in <style> and style="..."), `scripts` (absolute URLs quoted in inline
    scripts)."""

    def __init__(self, page: str) -> None:
        super().__init__()
        self.attributes: list[str] = []
        self.css: list[str] = []
        self.scripts: list[str] = []
        self._inside: str | None = None
        self.feed(page)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if not value:
                continue
            if name == "srcset":
                self.attributes += [candidate.split()[0] for candidate in value.split(",") if candidate.strip()]
            elif name in URL_ATTRIBUTES:
                self.attributes.append(value)
            elif name == "style":
                self.css += css_urls(value)
            elif name == "content" and (dict(attrs).get("http-equiv") or "").lower() == "refresh":
                self.attributes += META_REFRESH_URL.findall(value)
        self._inside = tag if tag in ("script", "style") else None

    def handle_endtag(self, tag: str) -> None:
        self._inside = None

    def handle_data(self, data: str) -> None:
        if self._inside == "style":
            self.css += css_urls(data)
        elif self._inside == "script":
            self.scripts += [url for url in SCRIPT_URL.findall(data) if urlparse(url).netloc]


def css_urls(css: str) -> list[str]:
    return [match.group(2) or match.group(4) for match in CSS_URL.finditer(css)]


def needs_network(url: str) -> bool:
    """Whether loading or following `url` goes to the network: a scheme other than data: (http:,
    https:, ...) or a host (//cdn.example/x.js)."""
    parsed = urlparse(url.strip())
    return parsed.scheme.lower() not in ("", "data") or bool(parsed.netloc)


def network_urls(page: str) -> list[str]:
    """Every URL of the page that needs the network; [] for a page that works offline."""
    references = PageReferences(page)
    scripts = [url for url in references.scripts if not url.startswith(NOT_FETCHED)]
    return [url for url in references.attributes + references.css + scripts if needs_network(url)]
