"""Where a worker's signing keys come from: given, or the environment."""

from __future__ import annotations

import logging
import os

from mediator.core.signing import Keyring, parse_keys
from mediator.errors import ConfigurationError

__all__ = ["CURRENT_ENV", "KEYS_ENV", "service_keyring"]

log = logging.getLogger("mediator.worker")

#: Where a worker not given ``keys=`` finds them (the mediator's shared-keys setting).
KEYS_ENV, CURRENT_ENV = "MEDIATOR_SIGNING__KEYS", "MEDIATOR_SIGNING__CURRENT"


def service_keyring(service: str, keys: Keyring | str | None) -> Keyring:
    """The service's keys: given, else from the environment; none is a configuration
    error that says what to do."""
    if isinstance(keys, Keyring):
        return keys
    spec = keys if keys is not None else os.environ.get(KEYS_ENV, "")
    if not spec.strip():
        msg = (
            f"service {service!r} has no signing keys: pass keys='id=secret' (the mediator's "
            f"key for it) or set {KEYS_ENV}; signing=False turns signing off, which the "
            "mediator must also do (signing.enabled: false)"
        )
        raise ConfigurationError(msg)
    try:
        current = os.environ.get(CURRENT_ENV) if keys is None else None
        return Keyring(parse_keys(spec, service), current or None)
    except ValueError as exc:
        msg = f"service {service!r}: bad signing keys: {exc}"
        raise ConfigurationError(msg) from None
