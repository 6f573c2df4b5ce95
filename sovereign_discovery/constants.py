"""Protocol constants and hard caps. One comment each says where the number comes from."""

from __future__ import annotations

# --- identifiers -------------------------------------------------------------------------------

#: Node IDs are the first 160 bits of SHA-256(public key) (DESIGN.md; Kademlia paper §2 uses
#: 160-bit IDs).
NODE_ID_BYTES = 20
NODE_ID_BITS = NODE_ID_BYTES * 8
#: Raw Ed25519 public keys and signatures (RFC 8032 §5.1).
PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
#: Ed25519 seed (the private key as stored in key files).
SEED_BYTES = 32

# --- routing table -----------------------------------------------------------------------------

#: Kademlia's k (paper §2.2; libp2p and discv5 use 20 too).
DEFAULT_BUCKET_SIZE = 20
#: Bucket sizes are stored as one byte per bucket in the kernel's layout.
MAX_BUCKET_SIZE = 255
#: Kademlia's b (paper §4.2): at most 4 bits per routing step (2^4 - 1 = 15 buckets per digit).
MAX_BUCKET_BITS = 4
#: Candidates kept per full bucket for when an entry fails (paper §4.1, "replacement cache").
DEFAULT_REPLACEMENT_CACHE_SIZE = 10
MAX_REPLACEMENT_CACHE_SIZE = 1024
#: Kademlia's α, the number of lookup requests in flight (paper §2.3).
DEFAULT_PARALLELISM = 3

# --- records -----------------------------------------------------------------------------------

#: A record must fit a BEP 44 mutable item (≤ 1,000 bytes) and so also leaves ≥ 280 bytes of a
#: 1,280-byte datagram (the IPv6 minimum MTU, RFC 8200 §5) for message headers.
MAX_RECORD_BYTES = 1000
MAX_DATAGRAM_BYTES = 1280
#: Bounds on record fields; the encoding of a record at every maximum is still ≤ MAX_RECORD_BYTES
#: (checked by a test).
MAX_RECORD_ADDRESSES = 8
MAX_RECORD_CAPABILITIES = 16
MAX_CAPABILITY_BYTES = 32
#: A record may not claim to stay valid longer than this (a week, like a generous DNS TTL); a
#: longer expiry is refused as "too far in the future".
MAX_RECORD_LIFETIME_S = 7 * 24 * 3600
#: Default lifetime of the node's own record; owners republish well before it ends.
DEFAULT_RECORD_TTL_S = 3600
#: The largest message (wire.py) is a datagram less the largest packet overhead (session.py),
#: that of a HANDSHAKE: 18 header + 32 public key + 32 ephemeral key + 64 signature + 16 AEAD tag
#: = 162 (docs/protocol.md, "Packets"). So every message fits either kind of packet.
HANDSHAKE_PACKET_OVERHEAD_BYTES = 18 + 32 + 32 + 64 + 16
MAX_MESSAGE_BYTES = MAX_DATAGRAM_BYTES - HANDSHAKE_PACKET_OVERHEAD_BYTES  # 1,118
#: Wire format version of peer records.
RECORD_FORMAT_VERSION = 1
