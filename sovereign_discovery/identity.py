"""Ed25519 identities: key generation, domain-separated signatures, public-key text, key files.

Domain separation: every signature is made over
``b"sovereign-discovery/v1\\x00" + purpose + b"\\x00" + message``, where ``purpose`` is one of the
:class:`SignaturePurpose` values. A signature made for one purpose (a peer record, say) therefore
never verifies for another (a session handshake), even over the same message bytes.

Key files hold the 32-byte Ed25519 seed as text::

    sovereign-discovery-ed25519-seed-v1
    <52 characters of lowercase base32>

They are created with mode 0600 and never overwritten unless asked. Loading a key file that group
or others may read or write raises :class:`~sovereign_discovery.errors.InsecureKeyFileError`, as
ssh refuses such a private key.
"""

from __future__ import annotations

import base64
import binascii
import enum
import os
import stat
import tempfile
from pathlib import Path

import nacl.exceptions
import nacl.signing

from .constants import PUBLIC_KEY_BYTES, SEED_BYTES, SIGNATURE_BYTES
from .errors import ArgumentTypeError, ArgumentValueError, InsecureKeyFileError, KeyFileError
from .keys import NodeId

__all__ = [
    "Identity",
    "SignaturePurpose",
    "verify_signature",
    "signed_message",
    "encode_public_key",
    "parse_public_key",
    "KEY_FILE_HEADER",
]

KEY_FILE_HEADER = "sovereign-discovery-ed25519-seed-v1"
_DOMAIN = b"sovereign-discovery/v1\x00"


class SignaturePurpose(enum.Enum):
    """What a signature is for. Each purpose is a separate signing domain."""

    PEER_RECORD = "peer-record"
    SESSION_HANDSHAKE = "session-handshake"
    #: the 0-RTT first packet (session.KIND_INITIATE): never valid as a handshake, nor back
    SESSION_INITIATE = "session-initiate"
    PROVIDER_ANNOUNCEMENT = "provider-announcement"
    LOCAL_ANNOUNCEMENT = "local-announcement"


def signed_message(purpose: SignaturePurpose, message: bytes) -> bytes:
    """The exact bytes an Ed25519 signature for ``purpose`` covers."""
    if not isinstance(purpose, SignaturePurpose):
        raise ArgumentTypeError(f"purpose must be a SignaturePurpose, not {type(purpose).__name__}")
    if not isinstance(message, (bytes, bytearray, memoryview)):
        raise ArgumentTypeError(f"message must be bytes, not {type(message).__name__}")
    return _DOMAIN + purpose.value.encode("ascii") + b"\x00" + bytes(message)


def _check_public_key(public_key: object) -> bytes:
    if not isinstance(public_key, (bytes, bytearray)):
        raise ArgumentTypeError(f"public_key must be bytes, not {type(public_key).__name__}")
    if len(public_key) != PUBLIC_KEY_BYTES:
        raise ArgumentValueError(f"public_key must be {PUBLIC_KEY_BYTES} bytes long, not {len(public_key)}")
    return bytes(public_key)


def verify_signature(
    public_key: bytes, purpose: SignaturePurpose, message: bytes, signature: bytes
) -> bool:
    """True if ``signature`` is ``public_key``'s signature of ``message`` for ``purpose``.

    Never raises for a bad signature or a key that is not a valid curve point (libsodium's
    verification rejects small-order and non-canonical points); wrong argument *types* are caller
    mistakes and raise.
    """
    key = _check_public_key(public_key)
    if not isinstance(signature, (bytes, bytearray)):
        raise ArgumentTypeError(f"signature must be bytes, not {type(signature).__name__}")
    if len(signature) != SIGNATURE_BYTES:
        return False
    try:
        nacl.signing.VerifyKey(key).verify(signed_message(purpose, message), bytes(signature))
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, nacl.exceptions.TypeError):
        return False
    return True


# --- text forms --------------------------------------------------------------------------------


def _b32(raw: bytes) -> str:
    return base64.b32encode(raw).decode("ascii").rstrip("=").lower()


def encode_public_key(public_key: bytes) -> str:
    """52 characters of lowercase base32 (RFC 4648, no padding), the same alphabet as node IDs."""
    return _b32(_check_public_key(public_key))


def parse_public_key(text: str) -> bytes:
    """Read :func:`encode_public_key`'s text (either case)."""
    if not isinstance(text, str):
        raise ArgumentTypeError(f"public key text must be str, not {type(text).__name__}")
    if len(text) != 52:
        raise ArgumentValueError(f"a public key is 52 base32 characters, got {len(text)}: {text[:60]!r}")
    try:
        raw = base64.b32decode(text.upper() + "====")
    except (binascii.Error, ValueError) as exc:
        raise ArgumentValueError(f"not a base32 public key: {text!r}") from exc
    if _b32(raw) != text.lower():  # the last character's unused bits must be zero
        raise ArgumentValueError(f"not a canonical base32 public key: {text!r}")
    return raw


# --- identities --------------------------------------------------------------------------------


class Identity:
    """An Ed25519 key pair: the node's identity. ``Identity.generate()``, ``Identity.load(path)``."""

    __slots__ = ("_signing_key", "_public_key", "_node_id")

    def __init__(self, signing_key: nacl.signing.SigningKey) -> None:
        if not isinstance(signing_key, nacl.signing.SigningKey):
            raise ArgumentTypeError(f"signing_key must be a nacl SigningKey, not {type(signing_key).__name__}")
        self._signing_key = signing_key
        self._public_key = bytes(signing_key.verify_key)
        self._node_id = NodeId.from_public_key(self._public_key)

    @classmethod
    def generate(cls) -> "Identity":
        return cls(nacl.signing.SigningKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> "Identity":
        """A deterministic identity from a 32-byte seed (tests, simulations, key files)."""
        if not isinstance(seed, (bytes, bytearray)):
            raise ArgumentTypeError(f"seed must be bytes, not {type(seed).__name__}")
        if len(seed) != SEED_BYTES:
            raise ArgumentValueError(f"seed must be {SEED_BYTES} bytes long, not {len(seed)}")
        return cls(nacl.signing.SigningKey(bytes(seed)))

    @property
    def public_key(self) -> bytes:
        return self._public_key

    @property
    def node_id(self) -> NodeId:
        return self._node_id

    def sign(self, purpose: SignaturePurpose, message: bytes) -> bytes:
        """A 64-byte Ed25519 signature of ``message`` in ``purpose``'s domain."""
        return self._signing_key.sign(signed_message(purpose, message)).signature

    def seed(self) -> bytes:
        """The private seed. Handle with care."""
        return bytes(self._signing_key)

    def __repr__(self) -> str:
        return f"Identity({self._node_id})"

    # --- key files ------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Write the seed to ``path`` with mode 0600. Refuses to replace an existing file unless
        ``overwrite`` (then the file is replaced atomically)."""
        path = Path(path)
        text = f"{KEY_FILE_HEADER}\n{_b32(self.seed())}\n".encode("ascii")
        if not overwrite:
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError as exc:
                raise KeyFileError(f"key file {path} already exists; refusing to overwrite it") from exc
            except OSError as exc:
                raise KeyFileError(f"cannot create key file {path}: {exc.strerror}") from exc
            with os.fdopen(fd, "wb") as handle:
                if hasattr(os, "fchmod"):  # a umask cannot widen it, but be explicit
                    os.fchmod(handle.fileno(), 0o600)
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            return path
        directory = path.parent if str(path.parent) else Path(".")
        try:
            fd, tmp = tempfile.mkstemp(prefix=".key-", dir=directory)  # mkstemp creates with 0600
        except OSError as exc:
            raise KeyFileError(f"cannot create key file in {directory}: {exc.strerror}") from exc
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "Identity":
        """Read a key file written by :meth:`save`. Refuses one that group or others can read or
        write (:class:`InsecureKeyFileError`), as ssh does."""
        path = Path(path)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError as exc:
            raise KeyFileError(f"key file {path} does not exist (create one with keygen)") from exc
        except OSError as exc:
            raise KeyFileError(f"cannot open key file {path}: {exc.strerror}") from exc
        try:
            info = os.fstat(fd)  # of the file actually opened, not of the path (no race)
            if not stat.S_ISREG(info.st_mode):
                raise KeyFileError(f"key file {path} is not a regular file")
            mode = stat.S_IMODE(info.st_mode)
            if os.name == "posix" and mode & 0o077:
                raise InsecureKeyFileError(
                    f"key file {path} has mode {mode:04o}: group or others can access it;"
                    f" refusing to use it (run: chmod 600 {path})"
                )
            data = os.read(fd, 4096)
        except OSError as exc:
            raise KeyFileError(f"cannot read key file {path}: {exc.strerror}") from exc
        finally:
            os.close(fd)
        try:
            try:
                parts = data.decode("ascii").split()
            except UnicodeDecodeError:
                raise ValueError("not ASCII text") from None
            if len(parts) != 2:
                raise ValueError(f"expected the line {KEY_FILE_HEADER} and a base32 seed")
            header, encoded = parts
            if header != KEY_FILE_HEADER:
                raise ValueError("wrong header")
            seed = base64.b32decode(encoded.upper() + "====")
            if len(seed) != SEED_BYTES:
                raise ValueError("wrong seed length")
        except (UnicodeDecodeError, ValueError, binascii.Error) as exc:
            raise KeyFileError(f"{path} is not a sovereign-discovery key file ({exc})") from exc
        return cls.from_seed(seed)
