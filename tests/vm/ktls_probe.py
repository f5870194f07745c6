#!/usr/bin/python3
"""Kernel TLS probe: can this kernel encrypt and decrypt TLS 1.2 records?

Over a loopback TCP connection, the client socket gets the "tls" upper layer
protocol and a TLS 1.2 AES-128-GCM transmit key; one record sent through it
is read raw on the server side, checked (header, explicit nonce, and, when
libcrypto is at hand, decrypted and authenticated independently), then the
server socket gets the matching receive key and a second record must come
out of it as plain text. /proc/net/tls_stat must count the software TX and
RX contexts.

Prints "PASS: ktls probe", or "SKIP: ktls probe: why" (exit 0) where the
kernel has no kernel TLS, as on a host built without CONFIG_TLS, or
"FAIL: ktls probe: why" (exit 1).

Run it in the kernel-TLS lane with: tests/vm/run python3 tests/vm/ktls_probe.py
"""

import ctypes
import ctypes.util
import errno
import os
import socket
import struct
import sys
import time

TCP_ULP = 31  # linux/tcp.h
SOL_TLS = 282  # linux/socket.h
TLS_TX = 1  # linux/tls.h
TLS_RX = 2
TLS_1_2_VERSION = 0x0303
TLS_CIPHER_AES_GCM_128 = 51
APPLICATION_DATA = 23

NAME = "ktls probe"


def skip(why):
    print(f"SKIP: {NAME}: {why}")
    sys.exit(0)


def fail(why):
    print(f"FAIL: {NAME}: {why}")
    sys.exit(1)


def tls_stat():
    """The counters of /proc/net/tls_stat as a dict (empty when absent)."""
    try:
        with open("/proc/net/tls_stat") as f:
            return {k: int(v) for k, v in (line.split() for line in f if line.strip())}
    except FileNotFoundError:
        return {}


def crypto_info(key, iv, salt, rec_seq):
    """struct tls12_crypto_info_aes_gcm_128 from linux/tls.h."""
    return struct.pack("<HH8s16s4s8s", TLS_1_2_VERSION, TLS_CIPHER_AES_GCM_128,
                       iv, key, salt, rec_seq)


def recv_exactly(sock, n):
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            fail(f"connection closed after {len(data)} of {n} bytes")
        data += chunk
    return data


def gcm_open(key, nonce, aad, ciphertext, tag):
    """AES-128-GCM decryption with OpenSSL's libcrypto through ctypes.

    Returns the plain text, None when the tag does not verify, or "n/a" when
    libcrypto cannot be loaded."""
    path = ctypes.util.find_library("crypto")
    if not path:
        return "n/a"
    try:
        lib = ctypes.CDLL(path)
    except OSError:
        return "n/a"
    lib.EVP_CIPHER_CTX_new.restype = ctypes.c_void_p
    lib.EVP_aes_128_gcm.restype = ctypes.c_void_p
    lib.EVP_CIPHER_CTX_free.argtypes = [ctypes.c_void_p]
    lib.EVP_DecryptInit_ex.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                       ctypes.c_char_p, ctypes.c_char_p]
    lib.EVP_DecryptUpdate.argtypes = [ctypes.c_void_p, ctypes.c_void_p,
                                      ctypes.POINTER(ctypes.c_int), ctypes.c_char_p, ctypes.c_int]
    lib.EVP_CIPHER_CTX_ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
                                        ctypes.c_char_p]
    lib.EVP_DecryptFinal_ex.argtypes = [ctypes.c_void_p, ctypes.c_void_p,
                                        ctypes.POINTER(ctypes.c_int)]
    EVP_CTRL_GCM_SET_IVLEN = 0x9
    EVP_CTRL_GCM_SET_TAG = 0x11

    ctx = lib.EVP_CIPHER_CTX_new()
    try:
        out = ctypes.create_string_buffer(len(ciphertext) + 16)
        n = ctypes.c_int(0)
        ok = (lib.EVP_DecryptInit_ex(ctx, lib.EVP_aes_128_gcm(), None, None, None) == 1
              and lib.EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_IVLEN, len(nonce), None) == 1
              and lib.EVP_DecryptInit_ex(ctx, None, None, key, nonce) == 1
              and lib.EVP_DecryptUpdate(ctx, None, ctypes.byref(n), aad, len(aad)) == 1
              and lib.EVP_DecryptUpdate(ctx, out, ctypes.byref(n), ciphertext,
                                        len(ciphertext)) == 1)
        if not ok:
            return "n/a"
        plain = out.raw[:n.value]
        if lib.EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_TAG, len(tag), tag) != 1:
            return "n/a"
        fin = ctypes.c_int(0)
        if lib.EVP_DecryptFinal_ex(ctx, ctypes.byref(out, n.value), ctypes.byref(fin)) != 1:
            return None
        return plain
    finally:
        lib.EVP_CIPHER_CTX_free(ctx)


def main():
    started = time.monotonic()
    if not sys.platform.startswith("linux"):
        skip("not Linux")

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    client = socket.create_connection(listener.getsockname(), timeout=30)
    server, _ = listener.accept()
    server.settimeout(30)
    listener.close()

    try:
        client.setsockopt(socket.IPPROTO_TCP, TCP_ULP, b"tls")
    except OSError as e:
        if e.errno == errno.ENOENT:
            skip('setsockopt(TCP_ULP, "tls") failed with ENOENT: this kernel has no '
                 f"kernel TLS (CONFIG_TLS off or module tls missing; kernel {os.uname().release})")
        skip(f'setsockopt(TCP_ULP, "tls") failed: {e}')

    key = bytes(range(1, 17))
    salt = bytes.fromhex("a1a2a3a4")
    iv = bytes.fromhex("0102030405060708")
    seq0 = bytes(8)
    before = tls_stat()
    try:
        client.setsockopt(SOL_TLS, TLS_TX, crypto_info(key, iv, salt, seq0))
    except OSError as e:
        if e.errno == errno.ENOENT:
            skip("TLS_TX failed with ENOENT: no gcm(aes) in the kernel "
                 "(load modules gcm and aesni_intel or aes_generic)")
        fail(f"setsockopt(SOL_TLS, TLS_TX): {e}")

    # Record 1: read raw on the server, check it independently.
    msg1 = b"kernel TLS says hello over loopback\r\n"
    client.sendall(msg1)
    header = recv_exactly(server, 5)
    rtype, version, length = struct.unpack("!BHH", header)
    if rtype != APPLICATION_DATA or version != TLS_1_2_VERSION:
        fail(f"unexpected record header {header.hex()}")
    if length != 8 + len(msg1) + 16:
        fail(f"record length {length}, expected {8 + len(msg1) + 16}")
    body = recv_exactly(server, length)
    explicit_nonce, ciphertext, tag = body[:8], body[8:-16], body[-16:]
    if explicit_nonce != iv:
        fail(f"explicit nonce {explicit_nonce.hex()}, expected {iv.hex()}")
    if ciphertext == msg1:
        fail("record carries the plain text")
    aad = seq0 + struct.pack("!BHH", APPLICATION_DATA, TLS_1_2_VERSION, len(msg1))
    plain = gcm_open(key, salt + explicit_nonce, aad, ciphertext, tag)
    if plain is None:
        fail("the record does not authenticate with libcrypto's AES-128-GCM")
    if plain != "n/a" and plain != msg1:
        fail("libcrypto decrypts the record to something else")
    checked = "decrypted by libcrypto" if plain != "n/a" else "libcrypto not loaded, not decrypted"
    print(f"record 1: {length + 5} bytes on the wire, {checked}")

    # Record 2: the server decrypts in the kernel (record sequence 1).
    try:
        server.setsockopt(socket.IPPROTO_TCP, TCP_ULP, b"tls")
        server.setsockopt(SOL_TLS, TLS_RX, crypto_info(key, iv, salt, struct.pack("!Q", 1)))
    except OSError as e:
        fail(f"installing TLS_RX on the server socket: {e}")
    msg2 = b"and reads it back in the kernel\r\n"
    client.sendall(msg2)
    got = recv_exactly(server, len(msg2))
    if got != msg2:
        fail(f"TLS_RX returned {got!r}")
    print("record 2: decrypted by the kernel (TLS_RX)")

    after = tls_stat()
    tx = after.get("TlsTxSw", 0) - before.get("TlsTxSw", 0)
    rx = after.get("TlsRxSw", 0) - before.get("TlsRxSw", 0)
    print(f"/proc/net/tls_stat: TlsTxSw {before.get('TlsTxSw', 0)} -> {after.get('TlsTxSw', 0)}, "
          f"TlsRxSw {before.get('TlsRxSw', 0)} -> {after.get('TlsRxSw', 0)}, "
          f"TlsCurrTxSw {after.get('TlsCurrTxSw', 0)}, TlsCurrRxSw {after.get('TlsCurrRxSw', 0)}")
    if tx < 1:
        fail("TlsTxSw did not increase")
    if rx < 1:
        fail("TlsRxSw did not increase")
    client.close()
    server.close()
    print(f"kernel {os.uname().release}, probe took {time.monotonic() - started:.2f}s")
    print(f"PASS: {NAME}")


if __name__ == "__main__":
    main()
