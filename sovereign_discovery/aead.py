"""ChaCha20-Poly1305 IETF (RFC 8439) through libsodium, for the session layer and its fast path.

PyNaCl's bindings format error strings on every call (~8 µs here), so :func:`encrypt` and
:func:`decrypt` call libsodium through PyNaCl's cffi handle directly, with the public bindings as
the fallback for another PyNaCl layout. :func:`function_addresses` gives the C fast path
(``_fastpath.use_aead``) the addresses of the same two libsodium functions, so that one libsodium
(the one PyNaCl loaded and initialised) serves both and nothing is linked twice.
"""

from __future__ import annotations

import threading

import nacl.bindings
import nacl.exceptions

__all__ = ["encrypt", "decrypt", "function_addresses", "TAG_BYTES"]

TAG_BYTES = 16  # Poly1305

try:
    from nacl._sodium import ffi as _ffi, lib as _lib

    _NULL = _ffi.NULL
    _new_buffer = _ffi.new
    _buffer = _ffi.buffer
    _encrypt_c = _lib.crypto_aead_chacha20poly1305_ietf_encrypt
    _decrypt_c = _lib.crypto_aead_chacha20poly1305_ietf_decrypt
    if _lib.crypto_aead_chacha20poly1305_ietf_abytes() != TAG_BYTES:  # pragma: no cover
        raise ImportError("unexpected tag size")

    # One scratch buffer per thread (libsodium runs without the GIL): no allocation per packet.
    _scratch = threading.local()

    def _scratch_buffer():
        buffer = getattr(_scratch, "buffer", None)
        if buffer is None:
            buffer = _scratch.buffer = _new_buffer("unsigned char[]", 2048)  # > any datagram
        return buffer

    def encrypt(message: bytes, aad: bytes, nonce: bytes, key: bytes) -> bytes:
        """The ciphertext of ``message`` with its 16-byte tag."""
        out = _scratch_buffer()
        size = len(message) + TAG_BYTES
        if size > 2048:  # pragma: no cover - callers cap messages far below
            out = _new_buffer("unsigned char[]", size)
        _encrypt_c(out, _NULL, message, len(message), aad, len(aad), _NULL, nonce, key)
        return _buffer(out, size)[:]

    def decrypt(ciphertext: bytes, aad: bytes, nonce: bytes, key: bytes) -> bytes | None:
        """The plaintext, or None when the tag does not verify."""
        size = len(ciphertext) - TAG_BYTES
        if size < 0:
            return None
        out = _scratch_buffer() if size <= 2048 else _new_buffer("unsigned char[]", size)
        if _decrypt_c(out, _NULL, _NULL, ciphertext, len(ciphertext), aad, len(aad), nonce, key):
            return None
        return _buffer(out, size)[:]

    def function_addresses() -> tuple[int, int] | None:
        """The addresses of libsodium's encrypt and decrypt functions in PyNaCl's copy."""
        return tuple(int(_ffi.cast("uintptr_t", _ffi.addressof(_lib, name)))
                     for name in ("crypto_aead_chacha20poly1305_ietf_encrypt",
                                  "crypto_aead_chacha20poly1305_ietf_decrypt"))

except ImportError:  # pragma: no cover - another PyNaCl layout

    def encrypt(message: bytes, aad: bytes, nonce: bytes, key: bytes) -> bytes:
        return nacl.bindings.crypto_aead_chacha20poly1305_ietf_encrypt(message, aad, nonce, key)

    def decrypt(ciphertext: bytes, aad: bytes, nonce: bytes, key: bytes) -> bytes | None:
        try:
            return nacl.bindings.crypto_aead_chacha20poly1305_ietf_decrypt(ciphertext, aad, nonce, key)
        except nacl.exceptions.CryptoError:
            return None

    def function_addresses() -> tuple[int, int] | None:
        return None
