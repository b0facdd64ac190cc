"""Signing keys and signatures, without a broker: the wire format, every way a check fails,
key rings and rotation, the settings that hold the keys."""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

import pytest
import yaml

from mediator.core.signing import (
    BAD_SIGNATURE,
    NO_KEY,
    UNSIGNED,
    Key,
    Keyring,
    SignatureError,
    Signatures,
)
from mediator.errors import ConfigurationError
from mediator.settings import load_settings, settings_document

VALUE = b'{"type":"reply","command_id":"c-1"}'


def test_the_signature_is_hex_hmac_sha256_of_the_value_under_the_key_id() -> None:
    ring = Keyring.parse("k1=first-secret-0123456789")
    headers = dict(ring.headers(VALUE))
    expected = hmac.new(b"first-secret-0123456789", VALUE, hashlib.sha256).hexdigest()
    assert headers == {"mediator-key": b"k1", "mediator-signature": expected.encode()}
    assert ring.check(VALUE, list(headers.items())).id == "k1"


@pytest.mark.parametrize(
    ("headers", "code", "says"),
    [
        ([], UNSIGNED, "not signed"),
        ([("mediator-key", b"k1")], UNSIGNED, "not signed"),
        ([("mediator-key", b"k9"), ("mediator-signature", b"00")], BAD_SIGNATURE, "'k9'"),
        ([("mediator-key", b"k1"), ("mediator-signature", b"00")], BAD_SIGNATURE, "match"),
    ],
)
def test_a_check_fails_with_a_code_and_a_reason(
    headers: list[tuple[str, bytes]], code: str, says: str
) -> None:
    ring = Keyring.parse("k1=first-secret-0123456789")
    with pytest.raises(SignatureError) as caught:
        ring.check(VALUE, headers)
    assert caught.value.code == code and says in caught.value.reason


def test_an_altered_value_fails_its_signature() -> None:
    ring = Keyring.parse("k1=first-secret-0123456789")
    headers = ring.headers(VALUE)
    with pytest.raises(SignatureError, match="does not match"):
        ring.check(VALUE.replace(b"c-1", b"c-2"), headers)
    with pytest.raises(SignatureError, match="does not match"):
        ring.check(None, headers)


def test_a_keyring_signs_with_its_current_key_and_accepts_all() -> None:
    old = Keyring.parse("old=the-old-secret-0123456789")
    both = Keyring.parse("new=the-new-secret-0123456789,old=the-old-secret-0123456789")
    assert both.current.id == "new" and both.ids == ["new", "old"]
    assert both.check(VALUE, old.headers(VALUE)).id == "old"
    with pytest.raises(SignatureError, match="not one of ours"):
        old.check(VALUE, both.headers(VALUE))
    assert Keyring(both.keys).current.id == "new"
    assert Keyring([Key("a", b"x" * 16), Key("b", b"y" * 16)], current="b").current.id == "b"


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("k1=short", "too short"),
        ("k1", "id=secret"),
        ("=first-secret-0123456789", "needs an id"),
        ("k1=first-secret-0123456789,k1=other-secret-0123456789", "given twice"),
        ('{"k1": 5}', "JSON"),
        ("{nope", "not valid JSON"),
        ("", "at least one key"),
    ],
)
def test_bad_keys_are_refused_with_a_reason(spec: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        Keyring.parse(spec)


def test_an_unknown_current_key_is_refused() -> None:
    with pytest.raises(ValueError, match="'k2' is not one of the keys"):
        Keyring([Key("k1", b"x" * 16)], current="k2")


def test_keys_parse_from_json_too() -> None:
    ring = Keyring.parse('{"b": "bbbbbbbbbbbbbbbbbbbb", "a": "aaaaaaaaaaaaaaaaaaaa"}')
    assert ring.ids == ["b", "a"] and ring.current.id == "b"


def test_the_mediator_signs_for_each_service_with_its_keys_and_knows_whose_a_key_is() -> None:
    shared = Keyring.parse("shared=shared-secret-0123456789")
    payment = Keyring.parse("pay=payment-secret-0123456789", service="payment")
    signatures = Signatures(shared, {"payment": payment})
    assert dict(signatures.sign("payment", VALUE))["mediator-key"] == b"pay"
    assert dict(signatures.sign("inventory", VALUE))["mediator-key"] == b"shared"
    assert signatures.check(VALUE, payment.headers(VALUE)).service == "payment"
    assert signatures.check(VALUE, shared.headers(VALUE)).service is None
    assert signatures.unsigned(["payment", "inventory"]) == []

    own_only = Signatures(None, {"payment": payment})
    assert own_only.unsigned(["payment", "inventory"]) == ["inventory"]
    with pytest.raises(SignatureError) as caught:
        own_only.sign("inventory", VALUE)
    assert caught.value.code == NO_KEY and "signing.services.inventory.keys" in caught.value.reason


def test_keys_come_from_settings_and_the_environment_and_stay_secret(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(
        "MEDIATOR_SIGNING__KEYS", "k2=second-secret-0123456789,k1=first-secret-012345"
    )
    monkeypatch.setenv(
        "MEDIATOR_SIGNING__SERVICES", '{"payment": {"keys": {"p": "pppppppppppppppp"}}}'
    )
    settings = load_settings()
    signatures = settings.signing.signatures()
    assert signatures is not None and signatures.shared is not None
    assert signatures.shared.ids == ["k2", "k1"]
    assert settings.signing.for_service("payment").current.id == "p"  # type: ignore[union-attr]
    assert settings.signing.for_service("inventory").current.id == "k2"  # type: ignore[union-attr]
    assert "second-secret" not in repr(settings) and "second-secret" not in str(
        settings.model_dump(mode="json")
    )
    # A config file written for another process holds the secrets and reads back the same.
    monkeypatch.delenv("MEDIATOR_SIGNING__KEYS")
    monkeypatch.delenv("MEDIATOR_SIGNING__SERVICES")
    path = tmp_path / "mediator.yaml"
    path.write_text(yaml.safe_dump(settings_document(settings)))
    again = load_settings(path).signing.signatures()
    assert again is not None and again.check(VALUE, signatures.sign("payment", VALUE))

    monkeypatch.setenv("MEDIATOR_SIGNING__KEYS", "k1=short")
    with pytest.raises(ConfigurationError, match="too short"):
        load_settings()
