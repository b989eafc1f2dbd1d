"""Secrets out of what spherecast publishes: a redacted deep copy of a config or provenance record.

A key is secret when one of its *words* (split at ``_``, ``-``, ``.``, spaces and camelCase) names a
secret — ``password``, ``token``, ``secret``, ``credentials``, ``auth`` … — or when it is ``key`` itself
or a qualified key (``api_key``, ``access_key``, ``private_key`` …). Whole words only: ``keep_runs``,
``tokenizer``, ``monkey`` and ``key_variables`` are not secrets. A secret key's value becomes ``"***"``
(``None`` stays ``None``: it tells a reader nothing was set and reveals nothing).

In every string, wherever it sits, URLs lose their user and password (``https://u:p@host`` →
``https://***@host``) and ``name=value`` pairs whose name is secret-looking (query parameters such as
``token=``, ``key=``, ``sig=``, ``X-Amz-Signature=``, or a DSN's ``password=``) have the value replaced.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from typing import Any

MASK = "***"

# Words that make a key secret wherever they appear in it.
SECRET_WORDS = frozenset({
    "password", "passwords", "passwd", "passphrase", "pwd", "secret", "secrets", "token", "tokens",
    "credential", "credentials", "creds", "auth", "authorization", "apikey", "private", "cookie", "cookies",
    "sig", "signature",
})
# ``key`` is a secret alone or after one of these words (``api_key``, ``AccessKeyId``, ``x-api-key``).
KEY_QUALIFIERS = frozenset({
    "api", "access", "secret", "private", "account", "signing", "encryption", "master", "client", "ssh",
    "storage", "shared", "subscription", "license", "auth",
})

_WORD = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+")
# scheme://userinfo@ — greedy up to the last @ before the path, so an unescaped @ in a password is covered.
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/?#\s]*)@")
# name=value as in a query string (?a=1&b=2), a fragment, or a key=value DSN ("host=h password=p").
_PAIR = re.compile(r"(?P<lead>^|[?&;#\s])(?P<name>[A-Za-z][\w.\-]*)=(?P<value>[^&;#\s]*)")


def _words(key: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(key)]


def is_secret_key(key: object) -> bool:
    """Whether a mapping key or parameter name names a secret (whole words, not substrings)."""
    if not isinstance(key, str):
        return False
    words = _words(key)
    if any(w in SECRET_WORDS for w in words) or words in (["key"], ["keys"]):
        return True
    return any(a in KEY_QUALIFIERS and b in ("key", "keys") for a, b in zip(words, words[1:], strict=False))


def redact_text(text: str) -> str:
    """``text`` with URL user/password parts and secret-looking ``name=value`` values replaced by ``***``."""
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@" if m["userinfo"] else m[0], text)

    def pair(m: re.Match[str]) -> str:
        if not is_secret_key(m["name"]) or not m["value"]:
            return m[0]
        return f"{m['lead']}{m['name']}={MASK}"

    return _PAIR.sub(pair, text)


def redact(data: Any) -> Any:
    """A deep copy of nested dicts/lists/tuples with secret keys' values masked and secrets in strings removed."""
    if isinstance(data, Mapping):
        return {k: (None if v is None else MASK) if is_secret_key(k) else redact(v) for k, v in data.items()}
    if isinstance(data, list):
        return [redact(v) for v in data]
    if isinstance(data, tuple):
        return tuple(redact(v) for v in data)
    if isinstance(data, str):
        return redact_text(data)
    return copy.deepcopy(data)  # anything else (numbers, paths, sets) as an independent copy
