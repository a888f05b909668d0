"""Secrets never leave the process: one redaction every log line, error line and artifact passes through.

Artifacts are written through ``artifact_json`` (every JSON object the job publishes or records in
storage: run.json, manifest.json, metrics, predictions, channel pointers and records, decisions)
and the model card through ``redact_text``: a credential inside a data file's key or a teacher's
path is masked there as in the logs. What cannot be masked is refused at start instead
(``job.settings``): a credential inside a name that becomes an object's key (the run id, the
output prefix, a channel).

Two kinds of secret are removed. Credentials embedded in a URL (``https://user:pass@host``,
``s3://key:secret@bucket``) anywhere in a text. And the values of the credential variables of
this process's environment (``AWS_SECRET_ACCESS_KEY``, tokens, passwords), registered once at
start, wherever they show up: a library's exception message, a URL, a path.

Redaction works on values, never on serialized text: a JSON line is built from redacted values,
so whatever a secret looks like, the line stays JSON with every key and non-secret value intact.
A credential variable's value counts as a secret only when it could be one (``could_be_secret``):
``TOKENIZERS_PARALLELISM=false`` or ``SOME_KEY=1`` hold a switch, not a credential, and masking
``false`` or ``1`` wherever they appear would only garble every line.
"""
from __future__ import annotations

import json
import math
import re
import threading

MASK = "***"
# scheme://userinfo@ : the userinfo (anything up to the last '@' before the host) goes
_URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/\s@'\"]*@)")
# variable names whose values are credentials (AWS, Hugging Face, trackers, anything *_SECRET*)
_SECRET_NAME = re.compile(r"(SECRET|PASSWORD|PASSWD|TOKEN|API_KEY|ACCESS_KEY|CREDENTIAL|PRIVATE_KEY)", re.IGNORECASE)
_MIN_SECRET_LENGTH = 4  # shorter values would mask ordinary words
_SHORT_WORD = 8  # a word or number this short is a switch or a setting, not a credential
_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")

_lock = threading.Lock()
_secrets: list[str] = []


def could_be_secret(value: str) -> bool:
    """Whether a credential variable's value is worth masking.

    Not a secret: fewer than 4 characters, or at most 8 characters that are all letters (``true``,
    ``false``, ``off``, ``disabled``) or one number (``1``, ``0.5``). Anything else is: real
    credentials are long random strings, and a short password still mixes letters with digits or
    signs.
    """
    value = value.strip()
    if len(value) < _MIN_SECRET_LENGTH:
        return False
    return not (len(value) <= _SHORT_WORD and (value.isalpha() or _NUMBER.fullmatch(value)))


def register_secrets(environ) -> None:
    """Remember the values of credential-looking variables, longest first (a secret may contain another)."""
    found = {str(v) for k, v in environ.items() if _SECRET_NAME.search(k) and v and could_be_secret(str(v))}
    with _lock:
        _secrets[:] = sorted(found | set(_secrets), key=len, reverse=True)


def redact_text(text: str) -> str:
    text = _URL_USERINFO.sub(lambda m: f"{m.group('scheme')}{MASK}@", text)
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, MASK)
    return text


def redact(value):
    """Redact strings anywhere in a JSON-like value (dicts, lists, tuples).

    Numbers, booleans and None pass through; any other object becomes its redacted ``str``, so
    what a JSON line would print with ``default=str`` is redacted too.
    """
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {redact(k): redact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) for v in value)
    if value is None or isinstance(value, (bool, int, float)):
        return value
    return redact_text(str(value))


def holds_secret(text: str) -> bool:
    """Whether ``text`` holds a credential (in a URL's userinfo, or a registered value)."""
    return redact_text(text) != text


def artifact_json(value, *, indent: int | None = None, sort_keys: bool = False, ensure_ascii: bool = True) -> bytes:
    """The bytes of a JSON artifact: every string redacted (keys included) and every NaN or infinite number null.

    The one encoder of what the job writes for others to read. Redacting values, never the text,
    keeps the document JSON whatever a secret looks like; a non-finite number would be written as
    the bare word NaN, which no strict JSON reader takes (a diverged metric says null instead).
    """
    return json.dumps(_finite(redact(value)), indent=indent, sort_keys=sort_keys, ensure_ascii=ensure_ascii,
                      allow_nan=False).encode()


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
