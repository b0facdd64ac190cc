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
    UNBOUND,
    UNSIGNED,
    Key,
    Keyring,
    SignatureError,
    Signatures,
)
from mediator.errors import ConfigurationError
from mediator.settings import load_settings, settings_document

VALUE = b'{"type":"reply","command_id":"c-1"}'
TOPIC, KEY = "mediator.replies", b"wf-1"


def test_the_signature_is_hex_hmac_sha256_of_topic_key_and_value_under_the_key_id() -> None:
    ring = Keyring.parse("k1=first-secret-0123456789")
    headers = dict(ring.headers(VALUE, TOPIC, KEY))
    signed = b"mediator-2\nmediator.replies\n77662d31\n" + VALUE  # the key in hex
    expected = hmac.new(b"first-secret-0123456789", signed, hashlib.sha256).hexdigest()
    assert headers == {"mediator-key": b"k1", "mediator-signature-2": expected.encode()}
    assert ring.check(VALUE, list(headers.items()), TOPIC, KEY).id == "k1"


def test_a_signed_record_published_again_elsewhere_does_not_verify() -> None:
    """A command for one service replayed into another's inbox, or a reply under another
    key: the signature covers the topic and the key, so neither holds."""
    ring = Keyring.parse("k1=first-secret-0123456789")
    headers = ring.headers(VALUE, "svc.inventory", KEY)
    with pytest.raises(SignatureError, match="published again elsewhere"):
        ring.check(VALUE, headers, "svc.payment", KEY)
    with pytest.raises(SignatureError, match="published again elsewhere"):
        ring.check(VALUE, headers, "svc.inventory", b"wf-2")


def test_a_signature_over_the_value_alone_holds_only_while_legacy_is_on() -> None:
    ring = Keyring.parse("k1=first-secret-0123456789")
    plain = hmac.new(b"first-secret-0123456789", VALUE, hashlib.sha256).hexdigest().encode()
    old = [("mediator-key", b"k1"), ("mediator-signature", plain)]
    with pytest.raises(SignatureError) as caught:
        ring.check(VALUE, old, TOPIC, KEY)
    assert caught.value.code == UNBOUND and "signing.legacy_signatures" in caught.value.reason
    assert ring.check(VALUE, old, TOPIC, KEY, legacy=True).id == "k1"
    # Legacy signers send both, so receivers that predate topic binding still verify.
    both = dict(ring.headers(VALUE, TOPIC, KEY, legacy=True))
    assert both["mediator-signature"] == plain and "mediator-signature-2" in both


@pytest.mark.parametrize(
    ("headers", "code", "says"),
    [
        ([], UNSIGNED, "not signed"),
        ([("mediator-key", b"k1")], UNSIGNED, "not signed"),
        ([("mediator-key", b"k9"), ("mediator-signature-2", b"00")], BAD_SIGNATURE, "'k9'"),
        ([("mediator-key", b"k1"), ("mediator-signature-2", b"00")], BAD_SIGNATURE, "match"),
    ],
)
def test_a_check_fails_with_a_code_and_a_reason(
    headers: list[tuple[str, bytes]], code: str, says: str
) -> None:
    ring = Keyring.parse("k1=first-secret-0123456789")
    with pytest.raises(SignatureError) as caught:
        ring.check(VALUE, headers, TOPIC, KEY)
    assert caught.value.code == code and says in caught.value.reason


def test_an_altered_value_fails_its_signature() -> None:
    ring = Keyring.parse("k1=first-secret-0123456789")
    headers = ring.headers(VALUE, TOPIC, KEY)
    with pytest.raises(SignatureError, match="does not match"):
        ring.check(VALUE.replace(b"c-1", b"c-2"), headers, TOPIC, KEY)
    with pytest.raises(SignatureError, match="does not match"):
        ring.check(None, headers, TOPIC, KEY)


def test_a_keyring_signs_with_its_current_key_and_accepts_all() -> None:
    old = Keyring.parse("old=the-old-secret-0123456789")
    both = Keyring.parse("new=the-new-secret-0123456789,old=the-old-secret-0123456789")
    assert both.current.id == "new" and both.ids == ["new", "old"]
    assert both.check(VALUE, old.headers(VALUE, TOPIC, KEY), TOPIC, KEY).id == "old"
    with pytest.raises(SignatureError, match="not one of ours"):
        old.check(VALUE, both.headers(VALUE, TOPIC, KEY), TOPIC, KEY)
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
    assert dict(signatures.sign("payment", VALUE, TOPIC, KEY))["mediator-key"] == b"pay"
    assert dict(signatures.sign("inventory", VALUE, TOPIC, KEY))["mediator-key"] == b"shared"
    assert (
        signatures.check(VALUE, payment.headers(VALUE, TOPIC, KEY), TOPIC, KEY).service == "payment"
    )
    assert signatures.check(VALUE, shared.headers(VALUE, TOPIC, KEY), TOPIC, KEY).service is None
    assert signatures.unsigned(["payment", "inventory"]) == []

    own_only = Signatures(None, {"payment": payment})
    assert own_only.unsigned(["payment", "inventory"]) == ["inventory"]
    with pytest.raises(SignatureError) as caught:
        own_only.sign("inventory", VALUE, TOPIC, KEY)
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
    signed = signatures.sign("payment", VALUE, TOPIC, KEY)
    assert again is not None and again.check(VALUE, signed, TOPIC, KEY)

    monkeypatch.setenv("MEDIATOR_SIGNING__KEYS", "k1=short")
    with pytest.raises(ConfigurationError, match="too short"):
        load_settings()


def test_keys_come_from_a_mounted_secret_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    secret = tmp_path / "signing-keys"
    secret.write_text("k1=first-secret-0123456789\n")
    monkeypatch.setenv("MEDIATOR_SIGNING__KEYS_FILE", str(secret))
    signing = load_settings().signing
    assert signing.keyring() is not None and signing.keyring().ids == ["k1"]  # type: ignore[union-attr]
    assert "first-secret" not in repr(signing)
    monkeypatch.setenv("MEDIATOR_SIGNING__KEYS_FILE", str(tmp_path / "missing"))
    with pytest.raises(ConfigurationError, match="keys_file"):
        load_settings()


def test_errors_echo_no_secret_and_list_no_key_ids() -> None:
    """A malformed key is refused without quoting it (it may be a secret pasted whole), and
    a forged key id is not told which ids would do."""
    with pytest.raises(ValueError) as caught:
        Keyring.parse("my-very-secret-value-without-an-id")
    assert "my-very-secret" not in str(caught.value)
    ring = Keyring.parse("real-id=first-secret-0123456789")
    with pytest.raises(SignatureError) as refused:
        ring.check(VALUE, [("mediator-key", b"guess"), ("mediator-signature-2", b"00")], TOPIC, KEY)
    assert "real-id" not in refused.value.reason
