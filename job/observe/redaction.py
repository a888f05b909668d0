"""Secrets never leave the process: one redaction every log line, error line and artifact passes through.

Two kinds of secret are removed. Credentials embedded in a URL (``https://user:pass@host``,
``s3://key:secret@bucket``) anywhere in a text. And the values of the credential variables of
this process's environment (``AWS_SECRET_ACCESS_KEY``, tokens, passwords), registered once at
start, wherever they show up: a library's exception message, a URL, a path.
"""
from __future__ import annotations

import re
import threading

MASK = "***"
# scheme://userinfo@ : the userinfo (anything up to the last '@' before the host) goes
_URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/\s@'\"]*@)")
# variable names whose values are credentials (AWS, Hugging Face, trackers, anything *_SECRET*)
_SECRET_NAME = re.compile(r"(SECRET|PASSWORD|PASSWD|TOKEN|API_KEY|ACCESS_KEY|CREDENTIAL|PRIVATE_KEY)", re.IGNORECASE)
_MIN_SECRET_LENGTH = 4  # shorter values would mask ordinary words

_lock = threading.Lock()
_secrets: list[str] = []


def register_secrets(environ) -> None:
    """Remember the values of credential-looking variables, longest first (a secret may contain another)."""
    found = {str(v) for k, v in environ.items() if _SECRET_NAME.search(k) and v and len(str(v)) >= _MIN_SECRET_LENGTH}
    with _lock:
        _secrets[:] = sorted(found | set(_secrets), key=len, reverse=True)


def redact_text(text: str) -> str:
    text = _URL_USERINFO.sub(lambda m: f"{m.group('scheme')}{MASK}@", text)
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, MASK)
    return text


def redact(value):
    """Redact strings anywhere in a JSON-like value (dicts, lists, tuples); other values pass through."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {redact(k): redact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) for v in value)
    return value
