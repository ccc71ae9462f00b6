"""The Hugging Face token: where it comes from, and keeping it out of everything sit writes.

`hf_token()` finds the token (environment, the huggingface_hub login, Colab's Secrets panel).
Everything that might echo it (log records, error messages, model cards) goes through
`redact()`, which replaces the known token values and anything shaped like a Hugging Face
token (`hf_` followed by a long run of letters and digits) with `hf_***`.

`install_log_redaction()` wraps the process-wide log record factory, so every record from any
logger (ours, huggingface_hub's, Prefect's, transformers') is scrubbed when it is created,
before any handler or formatter sees it. `RedactingFilter` does the same for one handler,
for code that builds its own logging setup.
"""

from __future__ import annotations

import logging
import os
import re
import threading

ENV_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
MASK = "hf_***"
# Real tokens are "hf_" + 34 letters/digits; 20+ also catches truncated ones without
# touching ordinary words such as "hf_hub_download".
TOKEN_PATTERN = re.compile(r"hf_[A-Za-z0-9]{20,}")

_known: set[str] = set()
_lock = threading.Lock()


def register_secret(value: str | None) -> None:
    """Redact this exact value from now on (a token that does not look like `hf_...`)."""
    if value and len(value) >= 8:  # a very short "secret" would shred ordinary text
        with _lock:
            _known.add(value)


def hf_token() -> str | None:
    """HF_TOKEN from the environment, the huggingface_hub login, or Colab's secrets.

    Whatever is found is registered for redaction before it is returned.
    """
    token = _find_token()
    register_secret(token)
    return token


def _find_token() -> str | None:
    for var in ENV_VARS:
        if os.environ.get(var):
            return os.environ[var]
    try:
        from huggingface_hub import get_token

        token = get_token()
        if token:
            return token
    except Exception:  # noqa: BLE001 - an unreadable token file just means "no token"
        pass
    try:  # only importable inside Colab
        from google.colab import userdata  # type: ignore

        return userdata.get("HF_TOKEN")
    except Exception:  # noqa: BLE001 - not in Colab, or the secret is missing / not granted
        return None


def redact(text: str) -> str:
    """`text` with every known secret and every hf_-token-shaped string masked."""
    if not text:
        return text
    with _lock:
        known = sorted(_known, key=len, reverse=True)  # longest first: one may contain another
    for value in known:
        text = text.replace(value, MASK)
    return TOKEN_PATTERN.sub(MASK, text)


def contains_secret(text: str) -> bool:
    return redact(text) != text


def redact_record(record: logging.LogRecord) -> logging.LogRecord:
    """Render the record's message (and traceback) now, redacted.

    Formatting is done eagerly because a secret can hide in the arguments or in the exception
    text, which formatters would otherwise render later, unredacted.
    """
    try:
        message = record.getMessage()
    except Exception:  # noqa: BLE001 - a bad format string: leave it for logging to report
        return record
    record.msg = redact(message)
    record.args = None
    if record.exc_info and not record.exc_text:
        record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
    elif record.exc_text:
        record.exc_text = redact(record.exc_text)
    if record.stack_info:
        record.stack_info = redact(record.stack_info)
    return record


class RedactingFilter(logging.Filter):
    """Attach to a handler to scrub every record it emits."""

    def filter(self, record: logging.LogRecord) -> bool:
        redact_record(record)
        return True


_installed = False


def install_log_redaction() -> None:
    """Scrub secrets from every log record created in this process from now on. Idempotent.

    Also registers the current token, so a token that does not match the hf_ pattern is
    caught too.
    """
    global _installed
    hf_token()
    with _lock:
        if _installed:
            return
        previous = logging.getLogRecordFactory()

        def factory(*args, **kwargs) -> logging.LogRecord:
            return redact_record(previous(*args, **kwargs))

        logging.setLogRecordFactory(factory)
        _installed = True
