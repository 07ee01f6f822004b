"""Tokens and API keys: read from the environment or the standard login file, never written anywhere.

Secrets matter in two places: workers need the Hugging Face token to load gated models (FLUX.1-dev, for one), and
`irgl publish` needs it to upload. irgl itself never stores one: config dumps, logs, rejects, manifests, cards and
reports go through `redact`, which replaces every known secret value by `***`.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

#: Environment variables that hold secrets, by name or by suffix.
SECRET_NAMES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_TOKEN", "HF_API_TOKEN")
_SECRET_NAME = re.compile(r"(TOKEN|API_KEY|APIKEY|SECRET|PASSWORD)$|^AWS_SECRET|_KEY_ID$", re.IGNORECASE)
MASK = "***"


def is_secret_name(name: str) -> bool:
    return name.upper() in SECRET_NAMES or bool(_SECRET_NAME.search(name))


def find_hf_token() -> tuple[str | None, str | None]:
    """The one lookup of the Hugging Face token: (token, where it comes from), or (None, None).

    In order: $HF_TOKEN and its older names (SECRET_NAMES), then the login file of `hf auth login`
    (huggingface_hub's HF_TOKEN_PATH, under $HF_HOME). The token is what the workers, the upload and the redaction
    use; `where` is what may be printed."""
    for name in SECRET_NAMES:
        value = os.environ.get(name, "").strip()
        if value:
            return value, f"the {name} environment variable"
    try:
        from huggingface_hub import constants

        path = constants.HF_TOKEN_PATH
        value = Path(path).read_text(encoding="utf-8").strip()
    except Exception:  # no huggingface_hub, no login file: no token
        return None, None
    return (value, f"the login file {path}") if value else (None, None)


def hf_token() -> str | None:
    """The Hugging Face token (find_hf_token), or None."""
    return find_hf_token()[0]


def hf_token_source() -> str | None:
    """Where the token would come from, for printing (`from the HF_TOKEN environment variable (not shown)`); None
    when there is none."""
    where = find_hf_token()[1]
    return f"from {where} (not shown)" if where else None


def secret_values(extra: dict[str, str] | None = None) -> list[str]:
    """Every secret value this process knows: secret-named env vars, the HF login token, and `extra`'s."""
    values = {v for k, v in os.environ.items() if is_secret_name(k) and v}
    values |= {v for k, v in (extra or {}).items() if is_secret_name(k) and v}
    token = hf_token()
    if token:
        values.add(token)
    # Longest first so that a secret containing another is masked whole; short values would mask ordinary text.
    return sorted((v for v in values if len(v) >= 6), key=len, reverse=True)


def redact(text: str, values: list[str] | None = None) -> str:
    for value in values if values is not None else secret_values():
        text = text.replace(value, MASK)
    return text


def redact_env(env: dict[str, str]) -> dict[str, str]:
    """An env mapping with secret-named values masked (for config dumps)."""
    return {k: (MASK if is_secret_name(k) else v) for k, v in env.items()}


def redact_obj(obj: Any, values: list[str]) -> Any:
    """Mask secret values in every string of a JSON-like object."""
    if isinstance(obj, str):
        return redact(obj, values)
    if isinstance(obj, dict):
        return {k: redact_obj(v, values) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact_obj(v, values) for v in obj]
    return obj


class RedactingFilter(logging.Filter):
    """A logging filter that masks secret values in every record's message."""

    def __init__(self) -> None:
        super().__init__()
        self.values = secret_values()

    def filter(self, record: logging.LogRecord) -> bool:
        if self.values:
            record.msg = redact(record.getMessage(), self.values)
            record.args = ()
        return True
