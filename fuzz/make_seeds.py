#!/usr/bin/env python3
"""Writes fuzz/seeds/vhost_user_stream/session.bin: one valid vhost-user-blk session in
the input layout of fuzz_targets/vhost_user_stream.rs (guest memory holding a read
request on queue 0, then the messages that set up memory and the ring and start it), so
the fuzzer starts from an input that reaches the data path and mutates from there; and
tracked.bin, the same session with inflight I/O tracking negotiated, an inflight region
asked for (GET_INFLIGHT_FD) and one offered (SET_INFLIGHT_FD, with guest memory's memfd,
which is not sealed: refused)."""

import os
import struct

FLAGS = 0x1  # vhost-user version 1
UADDR = 0x7F00_0000_0000  # the frontend's (made-up) address of guest physical 0
QSIZE = 16
DESC, AVAIL, USED = 0x0, 0x100, 0x200
HDR, DATA, STATUS = 0x1000, 0x2000, 0x3000


def msg(code, payload=b"", fds=()):
    """One message: descriptor spec byte, header, payload. `fds` are pool indices
    (0 memfd, 1 kick, 2 call, 3 error)."""
    spec = len(fds)
    for i, f in enumerate(fds):
        spec |= f << (2 + 2 * i)
    return bytes([spec]) + struct.pack("<III", code, FLAGS, len(payload)) + payload


def guest_memory():
    mem = bytearray(STATUS + 1)
    descs = [
        (HDR, 16, 0x1, 1),  # header, NEXT
        (DATA, 512, 0x3, 2),  # read data, WRITE | NEXT
        (STATUS, 1, 0x2, 0),  # status, WRITE
    ]
    for i, (addr, length, flags, nxt) in enumerate(descs):
        struct.pack_into("<QIHH", mem, DESC + 16 * i, addr, length, flags, nxt)
    struct.pack_into("<HHH", mem, AVAIL, 0, 1, 0)  # flags, idx 1, ring[0] = head 0
    struct.pack_into("<IIQ", mem, HDR, 0, 0, 0)  # VIRTIO_BLK_T_IN, ioprio, sector 0
    mem[STATUS] = 0xFF
    return bytes(mem)


INFLIGHT_SHMFD = 1 << 12


def session(tracked=False):
    features = (1 << 32) | (1 << 30)  # VERSION_1, VHOST_USER_F_PROTOCOL_FEATURES
    protocol = INFLIGHT_SHMFD if tracked else 0
    inflight = struct.pack("<QQHH", 4096, 0, 1, QSIZE)
    tracking = [
        msg(31, inflight),  # GET_INFLIGHT_FD
        msg(32, inflight, fds=(0,)),  # SET_INFLIGHT_FD
    ] if tracked else []
    region = struct.pack("<QQQQ", 0, 1 << 20, UADDR, 0)
    vring_addr = struct.pack(
        "<IIQQQQ", 0, 0, UADDR + DESC, UADDR + USED, UADDR + AVAIL, 0
    )
    return b"".join(
        [
            msg(3),  # SET_OWNER
            msg(2, struct.pack("<Q", features)),  # SET_FEATURES
            msg(16, struct.pack("<Q", protocol)),  # SET_PROTOCOL_FEATURES
            msg(5, struct.pack("<II", 1, 0) + region, fds=(0,)),  # SET_MEM_TABLE
            *tracking,
            msg(8, struct.pack("<II", 0, QSIZE)),  # SET_VRING_NUM
            msg(9, vring_addr),  # SET_VRING_ADDR
            msg(10, struct.pack("<II", 0, 0)),  # SET_VRING_BASE
            msg(13, struct.pack("<Q", 0), fds=(2,)),  # SET_VRING_CALL
            msg(14, struct.pack("<Q", 0), fds=(3,)),  # SET_VRING_ERR
            msg(12, struct.pack("<Q", 0), fds=(1,)),  # SET_VRING_KICK
            msg(18, struct.pack("<II", 0, 1)),  # SET_VRING_ENABLE
        ]
    )


def main():
    mem = guest_memory()
    data = struct.pack("<H", len(mem)) + mem + session()
    out = os.path.join(os.path.dirname(__file__), "seeds", "vhost_user_stream")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "session.bin"), "wb") as f:
        f.write(data)
    tracked = struct.pack("<H", len(mem)) + mem + session(tracked=True)
    with open(os.path.join(out, "tracked.bin"), "wb") as f:
        f.write(tracked)


if __name__ == "__main__":
    main()
