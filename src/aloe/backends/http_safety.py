"""The HTTP engine's safety rules for its settings: where a key may go and what a URL may hold.

An OpenAI-compatible server is named by ``base_url`` (one, or a pool) and its key by the name
of an environment variable (``api_key_env``). The rules, checked by ``aloe check`` before
anything runs and again whenever the engine opens:

* a URL is http(s) with a host, and carries no credentials, query string or fragment (keys
  hide there, and URLs are recorded in manifests);
* the key goes only over https, or over plain http to this machine (loopback), unless
  ``allow_insecure_key: true`` says it may cross a network in the clear;
* whatever is recorded or printed carries :func:`redact_url`'s form of a URL.
"""

from __future__ import annotations

import ipaddress
import re
import urllib.parse
from typing import Sequence

from aloe.errors import ConfigError
from aloe.yamlfile import short

ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")


def redact_url(url: str) -> str:
    """``url`` without credentials (user:password@) and without its query string and fragment
    (where keys hide too: ``?api_key=...``), for anything recorded or printed."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError:
        return "<unparseable URL>"
    if parts.username is None and parts.password is None and not parts.query and not parts.fragment:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    if port:
        host += f":{port}"
    return urllib.parse.urlunsplit(
        (parts.scheme, host, parts.path, "***" if parts.query else "", "***" if parts.fragment else "")
    )


def is_loopback(url: str) -> bool:
    host = urllib.parse.urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_url(url: str, key: str) -> None:
    """An OpenAI-compatible server's URL: http(s), a host, no credentials, no spaces."""
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError as e:
        raise ConfigError(f"{key}: {short(redact_url(url))} is not a valid URL ({e})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or any(c.isspace() for c in url):
        raise ConfigError(
            f"{key}: {short(redact_url(url))} is not an http(s) URL with a host, e.g. http://127.0.0.1:8000/v1"
        )
    if parts.username is not None or parts.password is not None:
        raise ConfigError(
            f"{key}: {redact_url(url)} carries credentials (user:password@); they would be "
            f"recorded in manifests; put the key in an environment variable named by api_key_env"
        )
    if parts.query or parts.fragment or url.rstrip().endswith(("?", "#")):
        raise ConfigError(
            f"{key}: {redact_url(url)} has a query string or fragment (?... or #...); a base URL "
            f"takes none (/chat/completions is appended to its path), and a key there would be "
            f"recorded in manifests: put the key in an environment variable named by api_key_env"
        )


def check_key_transport(urls: Sequence[str], api_key_env: str | None, allow_insecure_key: bool, key: str) -> None:
    """``api_key_env`` names a variable, and the key it holds would not cross a network in the clear."""
    if api_key_env is None:
        return
    if not ENV_NAME.fullmatch(api_key_env):
        raise ConfigError(
            f"{key}api_key_env: {short(api_key_env)} is not an environment variable name "
            f"(letters, digits and '_', e.g. OPENAI_API_KEY)"
        )
    plain = [u for u in urls if urllib.parse.urlsplit(u).scheme == "http" and not is_loopback(u)]
    if plain and not allow_insecure_key:
        raise ConfigError(
            f"{key}api_key_env: the key would be sent over plain http to {redact_url(plain[0])}, "
            f"readable on the way; use https, or set allow_insecure_key: true if you mean it"
        )


def check_settings(
    base_url: str | Sequence[str] | None, api_key_env: str | None, allow_insecure_key: bool, where: str = ""
) -> None:
    """Every rule above for one engine's settings; ``where`` (e.g. ``"roles.judge."``) prefixes the key."""
    urls = (base_url,) if isinstance(base_url, str) else tuple(base_url or ())
    for i, url in enumerate(urls):
        check_url(url, f"{where}base_url" if isinstance(base_url, str) else f"{where}base_url[{i}]")
    check_key_transport(urls, api_key_env, allow_insecure_key, where)
