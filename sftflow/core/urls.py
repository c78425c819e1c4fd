"""The one way a URL is made safe to write into a record, a card, an artifact or a log.

A URL setting may carry credentials: ``http://user:password@host`` (userinfo), or a token, key
or signature in its query (``?token=…``, presigned ``X-Amz-Signature=…``). ``redact_url``
removes both and keeps the rest of the URL as it was written; a URL without credentials comes
back unchanged (same string). Pure: no I/O, no settings.
"""

from __future__ import annotations

from urllib.parse import unquote, urlsplit, urlunsplit

#: A query (or fragment) parameter whose lowercased name contains one of these is a secret.
SECRET_PARTS = ("token", "key", "password", "passwd", "secret", "signature", "credential")
#: ... or is one of these, or starts with one of the prefixes (presigned URLs).
SECRET_NAMES = frozenset({"sig", "pwd", "auth", "authorization", "session"})
SECRET_PREFIXES = ("x-amz-", "x-goog-")


def secret_parameter(name: str) -> bool:
    """Whether a query parameter of this name holds a secret (by its name only)."""
    n = unquote(name).strip().lower()
    return (n in SECRET_NAMES or n.startswith(SECRET_PREFIXES)
            or any(part in n for part in SECRET_PARTS))


def _drop_secret_parameters(query: str) -> str:
    """``query`` (``a=1&token=x``) without its secret parameters, the others as written."""
    kept = [p for p in query.split("&") if not secret_parameter(p.split("=", 1)[0])]
    return "&".join(kept)


def redact_url(url: str) -> str:
    """``url`` without userinfo (user and password) and without query or fragment parameters
    that look like secrets (``token``, ``key``, ``password``, ``secret``, ``signature``,
    ``X-Amz-*``, ...). Anything else is kept as written."""
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. an unclosed IPv6 bracket: keep what is surely no credential
        scheme, sep, rest = url.partition("://")
        host = rest.split("?", 1)[0].split("#", 1)[0].rpartition("@")[2]
        return f"{scheme}{sep}{host}" if sep else ""
    netloc = parts.netloc.rpartition("@")[2]
    query = _drop_secret_parameters(parts.query) if parts.query else parts.query
    fragment = parts.fragment
    if "=" in fragment:
        fragment = _drop_secret_parameters(fragment)
    if (netloc, query, fragment) == (parts.netloc, parts.query, parts.fragment):
        return url
    return urlunsplit((parts.scheme, netloc, parts.path, query, fragment))
