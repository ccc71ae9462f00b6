"""Token lookup and redaction (sit_core/secrets.py).

Covers: where hf_token() looks (environment, huggingface_hub's login, Colab's userdata via a
stand-in `google.colab` module) and that what it finds is registered for redaction; redact()
on known values and hf_-shaped strings; the log record factory and the handler filter
scrubbing messages, %-arguments and tracebacks. The end-to-end check (no file a run writes, no
hub object and no log line holds the token) is in tests/test_hub.py.
"""

from __future__ import annotations

import logging
import sys
import types

import pytest

from sit_core import secrets
from sit_core.secrets import MASK, RedactingFilter, hf_token, install_log_redaction, redact, register_secret

FAKE = "hf_FakeTokenForTestsOnly0123456789abcd"


@pytest.fixture
def no_token(monkeypatch):
    for var in secrets.ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)


def test_token_from_environment_is_registered(no_token, monkeypatch):
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", "plain-secret-value-42")
    assert hf_token() == "plain-secret-value-42"
    assert redact("value: plain-secret-value-42!") == f"value: {MASK}!"


def test_token_from_colab_userdata(no_token, monkeypatch):
    colab = types.ModuleType("google.colab")
    colab.userdata = types.SimpleNamespace(get=lambda name: FAKE if name == "HF_TOKEN" else None)
    monkeypatch.setitem(sys.modules, "google", types.ModuleType("google"))
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    assert hf_token() == FAKE


def test_no_token_anywhere(no_token, monkeypatch):
    monkeypatch.setitem(sys.modules, "google.colab", None)  # not in Colab: the import fails
    assert hf_token() is None


def test_config_reexports_the_same_function():
    from sit_core import config

    assert config.hf_token is hf_token


def test_redact_patterns_and_ordinary_text():
    assert redact(f"Authorization: Bearer {FAKE}") == f"Authorization: Bearer {MASK}"
    assert redact("call hf_hub_download(repo)") == "call hf_hub_download(repo)"  # not a token
    register_secret("abc")  # too short to redact safely: ignored
    assert redact("abc") == "abc"


def test_log_records_are_scrubbed_everywhere(caplog):
    install_log_redaction()
    install_log_redaction()  # idempotent
    caplog.set_level(logging.INFO)
    log = logging.getLogger("some.library")
    log.info("token=%s", FAKE)
    log.info({"headers": {"authorization": f"Bearer {FAKE}"}})
    try:
        raise RuntimeError(f"request failed with {FAKE}")
    except RuntimeError:
        log.exception("upload failed")
    assert FAKE not in caplog.text
    assert caplog.text.count(MASK) >= 3


def test_handler_filter_for_own_logging_setups():
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "using %s", (FAKE,), None)
    assert RedactingFilter().filter(record)
    assert record.getMessage() == f"using {MASK}"
