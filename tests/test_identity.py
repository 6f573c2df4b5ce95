"""Identities: signatures with domain separation, public-key text, and key files."""

from __future__ import annotations

import os
import stat

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sovereign_discovery import (
    ArgumentValueError,
    Identity,
    InsecureKeyFileError,
    KeyFileError,
    NodeId,
    SignaturePurpose,
    encode_public_key,
    parse_public_key,
    verify_signature,
)
from sovereign_discovery.identity import KEY_FILE_HEADER


def test_node_id_is_derived_from_the_public_key():
    me = Identity.from_seed(bytes(32))
    assert me.node_id == NodeId.from_public_key(me.public_key)
    assert Identity.from_seed(bytes(32)).public_key == me.public_key  # deterministic


def test_signature_verifies_only_for_its_purpose_message_and_key():
    me, other = Identity.generate(), Identity.generate()
    message = b"hello"
    signature = me.sign(SignaturePurpose.PEER_RECORD, message)
    assert verify_signature(me.public_key, SignaturePurpose.PEER_RECORD, message, signature)
    for purpose in SignaturePurpose:
        if purpose is not SignaturePurpose.PEER_RECORD:
            assert not verify_signature(me.public_key, purpose, message, signature)
    assert not verify_signature(other.public_key, SignaturePurpose.PEER_RECORD, message, signature)
    assert not verify_signature(me.public_key, SignaturePurpose.PEER_RECORD, b"hellO", signature)
    assert not verify_signature(me.public_key, SignaturePurpose.PEER_RECORD, message, signature[:-1])


@given(st.integers(0, 63), st.integers(1, 255))
def test_any_flipped_signature_bit_fails(position, mask):
    me = Identity.from_seed(b"s" * 32)
    signature = bytearray(me.sign(SignaturePurpose.SESSION_HANDSHAKE, b"m"))
    signature[position] ^= mask
    assert not verify_signature(me.public_key, SignaturePurpose.SESSION_HANDSHAKE, b"m", bytes(signature))


def test_invalid_curve_points_do_not_verify_or_raise():
    for key in (bytes(32), b"\xff" * 32, bytes([1] + [0] * 31)):
        assert not verify_signature(key, SignaturePurpose.PEER_RECORD, b"m", bytes(64))


@given(st.binary(min_size=32, max_size=32))
def test_public_key_text_round_trips(raw):
    text = encode_public_key(raw)
    assert len(text) == 52 and text == text.lower()
    assert parse_public_key(text) == raw
    assert parse_public_key(text.upper()) == raw


@pytest.mark.parametrize("text", ["a" * 51, "a" * 53, "1" * 52, "a" * 51 + "b"])
def test_public_key_text_rejects_garbage(text):
    with pytest.raises(ArgumentValueError, match="public key"):
        parse_public_key(text)


# --- key files -----------------------------------------------------------------------------------


def test_key_file_is_created_0600_and_loads_back(tmp_path):
    me = Identity.generate()
    old_umask = os.umask(0)  # even a permissive umask must not widen the file
    try:
        path = me.save(tmp_path / "node.key")
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text().startswith(KEY_FILE_HEADER + "\n")
    assert Identity.load(path).node_id == me.node_id


def test_existing_key_file_is_not_overwritten_unless_asked(tmp_path):
    first, second = Identity.generate(), Identity.generate()
    first.save(tmp_path / "k")
    with pytest.raises(KeyFileError, match="already exists"):
        second.save(tmp_path / "k")
    assert Identity.load(tmp_path / "k").public_key == first.public_key
    second.save(tmp_path / "k", overwrite=True)
    assert Identity.load(tmp_path / "k").public_key == second.public_key
    assert stat.S_IMODE((tmp_path / "k").stat().st_mode) == 0o600


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o606, 0o700 | 0o004])
def test_key_file_readable_by_others_is_refused(tmp_path, mode):
    path = Identity.generate().save(tmp_path / "k")
    path.chmod(mode)
    with pytest.raises(InsecureKeyFileError, match="chmod 600"):
        Identity.load(path)


def test_missing_and_malformed_key_files_get_clear_errors(tmp_path):
    with pytest.raises(KeyFileError, match="does not exist"):
        Identity.load(tmp_path / "absent")
    bad = tmp_path / "bad"
    for content in (b"", b"nonsense\n", KEY_FILE_HEADER.encode() + b"\n!!!\n",
                    KEY_FILE_HEADER.encode() + b"\naaaa\n", b"\xff\xfe"):
        bad.unlink(missing_ok=True)
        fd = os.open(bad, os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, content)
        os.close(fd)
        with pytest.raises(KeyFileError, match="not a sovereign-discovery key file") as caught:
            Identity.load(bad)
        assert "unpack" not in str(caught.value) and "codec" not in str(caught.value)  # no Python internals


def test_a_directory_is_not_a_key_file(tmp_path):
    (tmp_path / "d").mkdir(mode=0o700)
    with pytest.raises(KeyFileError):
        Identity.load(tmp_path / "d")


def test_seed_length_is_checked():
    with pytest.raises(ArgumentValueError, match="seed"):
        Identity.from_seed(b"short")
