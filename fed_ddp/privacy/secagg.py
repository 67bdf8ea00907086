"""Secure aggregation by pairwise additive masking (Bonawitz et al. 2017, arXiv 1611.04482), per round.

Every sampled client u (a virtual client: each has its own keys, made fresh every round from the OS's
entropy) and the server run four steps; the server learns the sum of the inputs of the clients that
reached step 3, and nothing else about any one of them:

1. keys      u -> server: two X25519 public keys (c_u: encrypts shares, s_u: agrees masks) and a
                          SHA-256 commitment to its self-mask seed b_u.
             server -> all: the roster U1 (clients whose keys are valid).
2. shares    u -> server: for every other v in U1, AES-GCM(key = HKDF(X25519(c_u, c_v))) of u's Shamir
                          shares (threshold t) of b_u and of s_u's private key.
             server -> v: the ciphertexts addressed to v.
3. masked    u -> server: y_u = x_u + PRG(b_u) + sum_{v > u} PRG(s_uv) - sum_{v < u} PRG(s_uv) mod 2^R,
                          where s_uv = HKDF(X25519(s_u, s_v)) is agreed by u and v alone and PRG is
                          ChaCha20's keystream. x_u is u's clipped update in fixed point.
             server -> all: who sent a masked input (U3); at least t must have.
4. unmask    u in U3 -> server: for every v in U1, its share of b_v if v is in U3, else of v's s key.
             server: reconstructs b_v (v in U3, checked against v's commitment) and s_v (v dropped,
                     checked against v's public key), removes every self-mask and every mask between a
                     survivor and a dropped client: sum_{u in U3} x_u mod 2^R.

Fixed point: each value is clipped to [-range, range] and stochastically rounded to an integer in
[-L, L], L = 2^(bits-1) - 1 (unbiased). The ring has R = bits + ceil(log2 m) bits for m clients in
the round, so the sum of m inputs cannot wrap; values travel bit-packed, R bits each.

Shamir sharing is over the prime field GF(2^521 - 1) (secrets are 32 bytes; ``cryptography`` has no
secret sharing, and a degree-(t-1) polynomial over Python integers is a few lines). Every other
primitive (X25519, HKDF-SHA256, AES-GCM, ChaCha20, SHA-256) is ``cryptography``'s.
"""

from __future__ import annotations

import hashlib
import math
import os
import secrets
import struct
from dataclasses import dataclass

import numpy as np
import torch
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

PRIME = 2 ** 521 - 1  # Mersenne prime > 2^256: a 32-byte secret is one field element
SHARE_BYTES = 66  # ceil(521 / 8)
ADVERT_BYTES = 4 + 32 + 32 + 32  # client id, c public key, s public key, commitment to b
PLAIN_SHARE_BYTES = 4 + 4 + 2 * SHARE_BYTES  # from, to, share of b, share of s
CIPHER_BYTES = 4 + 4 + 12 + PLAIN_SHARE_BYTES + 16  # from, to (clear, bound as AAD), nonce, ciphertext + tag
REVEAL_BYTES = 4 + SHARE_BYTES  # owner id, share
MASKED_HEAD = 4 + 4  # client id, present flag


# -- fixed point ---------------------------------------------------------------------------------------
def ring_bits(bits: int, clients: int) -> int:
    """Bits of the ring Z_{2^R} in which the sum of ``clients`` values of ``bits`` bits cannot wrap."""
    return bits + max(0, math.ceil(math.log2(max(1, clients))))


def encode_fixed(x: torch.Tensor, value_range: float, bits: int, gen: torch.Generator) -> np.ndarray:
    """Clip every value to [-value_range, value_range] and round it stochastically to an integer in
    [-L, L], L = 2^(bits-1) - 1 (E[q] * step = the clipped value)."""
    levels = 2 ** (bits - 1) - 1
    step = value_range / levels
    y = x.double().clamp(-value_range, value_range) / step
    q = torch.floor(y + torch.rand(y.shape, generator=gen, dtype=torch.float64)).clamp_(-levels, levels)
    return q.to(torch.int64).numpy()


def to_ring(q: np.ndarray, ring: int) -> np.ndarray:
    return q.astype(np.int64).view(np.uint64) & np.uint64((1 << ring) - 1)


def from_ring(s: np.ndarray, ring: int) -> np.ndarray:
    """Ring elements -> signed integers (two's complement in R bits)."""
    s = s.astype(np.uint64) & np.uint64((1 << ring) - 1)
    signed = s.astype(np.int64)
    return np.where(s >= np.uint64(1 << (ring - 1)), signed - np.int64(1 << (ring - 1)) - np.int64(1 << (ring - 1)),
                    signed)


def decode_fixed(total: np.ndarray, value_range: float, bits: int) -> torch.Tensor:
    return torch.from_numpy(total.astype(np.float64)) * (value_range / (2 ** (bits - 1) - 1))


def pack(values: np.ndarray, ring: int) -> bytes:
    """Ring elements (uint64, < 2^R) as R bits each, little-endian bit order; ceil(n R / 8) bytes."""
    bits = np.unpackbits(values.astype("<u8").view(np.uint8).reshape(-1, 8), axis=1, bitorder="little")
    return np.packbits(bits[:, :ring].reshape(-1), bitorder="little").tobytes()


def unpack(buf: bytes, n: int, ring: int) -> np.ndarray:
    bits = np.unpackbits(np.frombuffer(buf, dtype=np.uint8), bitorder="little")[:n * ring].reshape(n, ring)
    full = np.zeros((n, 64), dtype=np.uint8)
    full[:, :ring] = bits
    return np.packbits(full, axis=1, bitorder="little").view("<u8").reshape(-1).astype(np.uint64)


def packed_bytes(n: int, ring: int) -> int:
    return (n * ring + 7) // 8


def prg(key: bytes, n: int, ring: int) -> np.ndarray:
    """n ring elements from ChaCha20's keystream under ``key`` (a fresh key per round and pair, so the
    all-zero nonce is never reused with one key)."""
    width = 4 if ring <= 32 else 8
    stream = Cipher(algorithms.ChaCha20(key, b"\0" * 16), mode=None).encryptor().update(bytes(n * width))
    v = np.frombuffer(stream, dtype="<u4" if width == 4 else "<u8").astype(np.uint64)
    return v & np.uint64((1 << ring) - 1)


def _kdf(secret: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


def _raw(priv: X25519PrivateKey) -> bytes:
    return priv.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                              serialization.NoEncryption())


def _pub(priv: X25519PrivateKey) -> bytes:
    return priv.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def pair_key(priv: X25519PrivateKey, peer_pub: bytes, info: bytes) -> bytes:
    """HKDF-SHA256 of the X25519 shared secret (ValueError on a low-order peer key)."""
    return _kdf(priv.exchange(X25519PublicKey.from_public_bytes(peer_pub)), info)


# -- Shamir over GF(p) -----------------------------------------------------------------------------------
def split(secret: bytes, xs: list[int], t: int) -> list[int]:
    """Shares f(x) for x in ``xs`` of a random polynomial of degree t - 1 with f(0) = secret."""
    coeffs = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(t - 1)]
    out = []
    for x in xs:
        acc = 0
        for c in reversed(coeffs):
            acc = (acc * x + c) % PRIME
        out.append(acc)
    return out


def combine(points: list[tuple[int, int]]) -> bytes:
    """f(0) from exactly t points (x, f(x)) by Lagrange interpolation; 32 bytes."""
    acc = 0
    for i, (xi, yi) in enumerate(points):
        num, den = 1, 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                num = num * (-xj) % PRIME
                den = den * (xi - xj) % PRIME
        acc = (acc + yi * num * pow(den, PRIME - 2, PRIME)) % PRIME
    if acc >= 1 << 256:
        raise ValueError("shares do not reconstruct a 32-byte secret")
    return acc.to_bytes(32, "big")


# -- messages -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Advert:
    client: int
    c_pub: bytes
    s_pub: bytes
    commit: bytes

    def to_bytes(self) -> bytes:
        return struct.pack("<i", self.client) + self.c_pub + self.s_pub + self.commit

    @classmethod
    def from_bytes(cls, b: bytes) -> Advert:
        if len(b) != ADVERT_BYTES:
            raise ValueError(f"key advert: {len(b)} bytes, expected {ADVERT_BYTES}")
        a = cls(struct.unpack("<i", b[:4])[0], b[4:36], b[36:68], b[68:100])
        probe = X25519PrivateKey.generate()
        for key in (a.c_pub, a.s_pub):  # a low-order point would make every agreed key all zeros: refused
            probe.exchange(X25519PublicKey.from_public_bytes(key))
        return a


def _info(kind: bytes, rnd: int, a: int, b: int) -> bytes:
    return b"fed_ddp secagg " + kind + struct.pack("<qii", rnd, min(a, b), max(a, b))


class Client:
    """One virtual client's side of one round."""

    def __init__(self, client: int, rnd: int):
        self.id, self.round = int(client), int(rnd)
        self._c, self._s = X25519PrivateKey.generate(), X25519PrivateKey.generate()
        self._b = os.urandom(32)
        self.roster: list[Advert] = []
        self.t = 0
        self.held: dict[int, tuple[int, int]] = {}  # owner -> (my share of b_owner, of s_owner)

    def advert(self) -> bytes:
        return Advert(self.id, _pub(self._c), _pub(self._s), hashlib.sha256(self._b).digest()).to_bytes()

    def x(self, client: int) -> int:
        """A client's Shamir abscissa: its position in the roster, plus one."""
        return next(i for i, a in enumerate(self.roster) if a.client == client) + 1

    def share(self, roster: list[Advert], t: int) -> list[bytes]:
        """Step 2: encrypted shares for every other client of the roster, in roster order."""
        self.roster, self.t = list(roster), int(t)
        xs = list(range(1, len(roster) + 1))
        b_sh, s_sh = split(self._b, xs, t), split(_raw(self._s), xs, t)
        out = []
        for i, peer in enumerate(roster):
            if peer.client == self.id:
                self.held[self.id] = (b_sh[i], s_sh[i])
                continue
            head = struct.pack("<ii", self.id, peer.client)
            key = pair_key(self._c, peer.c_pub, _info(b"share", self.round, self.id, peer.client))
            nonce = os.urandom(12)
            plain = head + b_sh[i].to_bytes(SHARE_BYTES, "big") + s_sh[i].to_bytes(SHARE_BYTES, "big")
            out.append(head + nonce + AESGCM(key).encrypt(nonce, plain, head + struct.pack("<q", self.round)))
        return out

    def receive(self, ciphertexts: list[bytes]) -> list[int]:
        """Step 2 (receiving): keep the shares addressed to me; the senders whose ciphertext fails."""
        bad = []
        for ct in ciphertexts:
            sender, to = struct.unpack("<ii", ct[:8])
            peer = next((a for a in self.roster if a.client == sender), None)
            try:
                if to != self.id or peer is None or len(ct) != CIPHER_BYTES:
                    raise ValueError("misrouted")
                key = pair_key(self._c, peer.c_pub, _info(b"share", self.round, self.id, sender))
                plain = AESGCM(key).decrypt(ct[8:20], ct[20:], ct[:8] + struct.pack("<q", self.round))
                if plain[:8] != ct[:8]:
                    raise ValueError("header mismatch")
                self.held[sender] = (int.from_bytes(plain[8:8 + SHARE_BYTES], "big"),
                                     int.from_bytes(plain[8 + SHARE_BYTES:], "big"))
            except (ValueError, InvalidTag):
                bad.append(sender)
        return bad

    def mask(self, q: np.ndarray, ring: int) -> np.ndarray:
        """Step 3: y = x + PRG(b) + sum_{v > me} PRG(s_uv) - sum_{v < me} PRG(s_uv) (mod 2^R)."""
        n = len(q)
        y = to_ring(q, ring) + prg(self._b, n, ring)
        for peer in self.roster:
            if peer.client == self.id:
                continue
            m = prg(pair_key(self._s, peer.s_pub, _info(b"mask", self.round, self.id, peer.client)), n, ring)
            y = y + m if peer.client > self.id else y - m  # uint64 wraps mod 2^64, a multiple of 2^R
        return y & np.uint64((1 << ring) - 1)

    def reveal(self, survivors: set[int]) -> bytes:
        """Step 4: for every roster client, my share of its b (it survived) or of its s key (it dropped).
        Refuses (ValueError) with fewer than t survivors: revealing would expose inputs."""
        if len(survivors) < self.t:
            raise ValueError(f"{len(survivors)} survivors < threshold {self.t}")
        out = []
        for a in self.roster:
            b_sh, s_sh = self.held.get(a.client, (0, 0))  # a share that never arrived reveals nothing
            out.append(struct.pack("<i", a.client) + (b_sh if a.client in survivors else s_sh).to_bytes(SHARE_BYTES,
                                                                                                         "big"))
        return b"".join(out)


def collect_adverts(adverts: dict[int, bytes]) -> tuple[list[Advert], dict[int, str]]:
    """Step 1 on the server: valid adverts -> the roster U1 (ascending ids); invalid ones dropped with a reason."""
    roster, bad = [], {}
    for cid, raw in sorted(adverts.items()):
        try:
            a = Advert.from_bytes(raw)
            if a.client != cid:
                raise ValueError(f"advert in client {cid}'s slot says {a.client}")
            roster.append(a)
        except ValueError as e:
            bad[cid] = f"bad key advert: {e}"
    return roster, bad


class Server:
    """The server's side of one round: it never holds a private key, only public ones and shares."""

    def __init__(self, rnd: int, t: int, n: int, ring: int, roster: list[Advert]):
        self.round, self.t, self.n, self.ring = int(rnd), int(t), int(n), int(ring)
        self.roster = list(roster)

    def unmask(self, masked: dict[int, np.ndarray], reveals: dict[int, bytes]) -> np.ndarray:
        """sum_{u in U3} x_u as signed integers, from the masked inputs of U3 = ``masked``'s keys and the
        reveals of (some of) them. Raises ValueError when a secret cannot be rebuilt and checked."""
        survivors = set(masked)
        if len(survivors) < self.t:
            raise ValueError(f"{len(survivors)} masked inputs < threshold {self.t}")
        xs = {a.client: i + 1 for i, a in enumerate(self.roster)}
        points: dict[int, list[tuple[int, int]]] = {a.client: [] for a in self.roster}
        for responder, raw in sorted(reveals.items()):
            if responder not in survivors or len(raw) != REVEAL_BYTES * len(self.roster):
                continue
            for k, a in enumerate(self.roster):  # record k is about roster client k: one per (responder, owner)
                rec = raw[k * REVEAL_BYTES:(k + 1) * REVEAL_BYTES]
                y = int.from_bytes(rec[4:], "big")
                if struct.unpack("<i", rec[:4])[0] == a.client and 0 < y < PRIME:
                    points[a.client].append((xs[responder], y))
        total = np.zeros(self.n, dtype=np.uint64)
        for cid in sorted(survivors):
            total += masked[cid]
        for a in self.roster:
            secret = self._rebuild(a, points[a.client], a.client in survivors)
            if a.client in survivors:  # remove its self-mask
                total -= prg(secret, self.n, self.ring)
            else:  # remove the masks it shared with every survivor
                s = X25519PrivateKey.from_private_bytes(secret)
                for u in self.roster:
                    if u.client in survivors:
                        m = prg(pair_key(s, u.s_pub, _info(b"mask", self.round, a.client, u.client)), self.n,
                                self.ring)
                        # u added +m if a > u, -m if a < u: undo that
                        total = total - m if a.client > u.client else total + m
        return from_ring(total, self.ring)

    def _rebuild(self, a: Advert, pts: list[tuple[int, int]], survived: bool) -> bytes:
        """A client's secret from t of its shares, checked against its commitment (self-mask seed) or its
        public key (mask key). When that fails (a responder lied), the other cyclic windows of t shares are
        tried: with more than t shares, every single liar is left out of one of them."""
        n, t = len(pts), self.t
        if n < t:
            raise ValueError(f"client {a.client}: {n} shares < threshold {t}")
        for i in range(n if n > t else 1):
            try:
                secret = combine([pts[(i + j) % n] for j in range(t)])
            except ValueError:
                continue
            if survived and hashlib.sha256(secret).digest() == a.commit:
                return secret
            if not survived and _pub(X25519PrivateKey.from_private_bytes(secret)) == a.s_pub:
                return secret
        what = "self-mask seed fails its commitment" if survived else "mask key does not match its public key"
        raise ValueError(f"client {a.client}: rebuilt {what} (every window of {t} of its {n} shares)")
