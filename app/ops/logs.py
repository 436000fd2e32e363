"""JSON log lines with secrets redacted (credentials in URLs, ``password=``/``token=``-style pairs, bearer
tokens, AWS access key ids, the path of webhook URLs), for log pipelines that parse structured fields. Every
role logs through this."""

from __future__ import annotations

import logging
import logging.config
import re
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import orjson

_SECRET_WORDS = (r"password|passwd|pwd|secret|secret[_-]?access[_-]?key|access[_-]?key(?:[_-]?id)?|session[_-]?token"
                 r"|token|api[_-]?key|authorization|credentials?|sasl[_-]?plain[_-]?password")
_REDACTIONS: tuple[tuple[re.Pattern[str], str], ...] = (
    # scheme://user:password@host -> scheme://***@host
    (re.compile(r"(?<=://)[^/@\s:]+:[^/@\s]*@"), "***@"),
    # Authorization: Bearer abc / Basic abc
    (re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]+"), r"\1 ***"),
    # password=abc, "token": "abc", Logplex-Drain-Token: d.abc, aws_secret_access_key = abc
    (re.compile(rf"""(?i)\b([\w-]*(?:{_SECRET_WORDS}))(["']?\s*[=:]\s*["']?)(?!\*\*\*)[^\s"',;&)}}\]]+"""),
     r"\1\2***"),
    # AWS access key ids (long-term AKIA..., temporary ASIA...)
    (re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b"), "***"),
)
_URL = re.compile(r"""(?i)\bhttps?://[^\s/?#"'<>]+[^\s"'<>]*""")
_WEBHOOK_URL = re.compile(r"(?i)hook|chat\.googleapis\.com")
"""Slack (hooks.slack.com), Discord (/api/webhooks/), Teams (webhook.office.com), Google Chat and most
self-hosted receivers: URLs whose path is itself the credential."""
_SECRET_KEY = re.compile(rf"(?i)(?:{_SECRET_WORDS})")
_RECORD_FIELDS = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


def url_origin(url: str) -> str:
    """``scheme://host[:port]`` of a URL, for logs and error texts: a webhook URL's path and query are
    often its secret (Slack, Discord). Text that is no URL (an e-mail address) is returned unchanged."""
    if "://" not in url:
        return url
    try:
        parts = urlsplit(url.strip())
        host, port = parts.hostname, parts.port
    except ValueError:
        return "<unparsable URL>"
    if not parts.scheme or not host:
        return "<unparsable URL>"
    host = f"[{host}]" if ":" in host else host
    return f"{parts.scheme.lower()}://{host}" + (f":{port}" if port is not None else "")


def _redact_webhook_url(m: re.Match[str]) -> str:
    url = m.group(0)
    return f"{url_origin(url)}/***" if _WEBHOOK_URL.search(url) else url


def redact(text: str) -> str:
    """Mask credentials in a log line or an error text; everything else is kept for the operator."""
    for pattern, repl in _REDACTIONS:
        text = pattern.sub(repl, text)
    return _URL.sub(_redact_webhook_url, text)


def _redact_value(key: str, value: Any) -> Any:
    if _SECRET_KEY.search(key):
        return "***"
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, (int, float, bool)) or value is None:
        return value
    return redact(repr(value))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (UTC, ms), level, logger, msg, exc (if any), and ``extra={...}`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": redact(record.getMessage()),
        }
        if record.exc_info:
            doc["exc"] = redact(self.formatException(record.exc_info))
        elif record.exc_text:
            doc["exc"] = redact(record.exc_text)
        if record.stack_info:
            doc["stack"] = redact(self.formatStack(record.stack_info))
        for key, value in record.__dict__.items():
            if key not in _RECORD_FIELDS and key not in doc and not key.startswith("_"):
                doc[key] = _redact_value(key, value)
        return orjson.dumps(doc, default=str).decode()


def json_logging_config(level: str | int = "INFO") -> dict[str, Any]:
    """``logging.config.dictConfig`` input: JSON lines on stdout. Faust takes it as ``logging_config``."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": JsonFormatter}},
        "handlers": {"stdout": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stdout"}},
        "root": {"level": level, "handlers": ["stdout"]},
    }


def setup_json_logging(level: str | int = "INFO") -> None:
    """For roles that configure logging themselves (web, ingest); the worker passes the config to Faust."""
    logging.config.dictConfig(json_logging_config(level))


# --- topics ---------------------------------------------------------------------------------------------
