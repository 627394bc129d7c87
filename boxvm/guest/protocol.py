"""Framed, multiplexed agent protocol (shared verbatim by the host and the guest agent).

A frame is ``!IIB`` (payload length, channel id, frame type) followed by the payload.
Channel 0 carries the agent's HELLO; every request opens its own channel with OPEN and
ends with RESULT, so any number of execs and copies share one virtio-serial port.

Flow control is credit based in both directions: a sender may have at most ``WINDOW``
unacknowledged data bytes in flight per channel and the receiver returns CREDIT as it
consumes. One slow reader therefore never stalls other channels and nobody buffers more
than a window. This module must import nothing beyond the stdlib the guest carries.
"""

import json
import struct

HEADER = struct.Struct("!IIB")
CREDIT_FMT = struct.Struct("!I")
MAX_PAYLOAD = 1 << 20
WINDOW = 1 << 20
CHUNK = 64 << 10

OPEN = 1  # host -> guest: JSON request {"op": ..., ...}
STDIN = 2  # host -> guest: bytes for the process
EOF = 3  # host -> guest: stdin closed
STDOUT = 4  # guest -> host
STDERR = 5  # guest -> host
CREDIT = 6  # either way: "I consumed N more bytes of your data"
SIGNAL = 7  # host -> guest: JSON {"signal": n}
RESIZE = 8  # host -> guest: JSON {"rows": r, "cols": c}
RESULT = 9  # guest -> host: JSON, last frame of a channel
HELLO = 10  # guest -> host on channel 0 when the agent starts
CLOSE = 11  # host -> guest: the client went away; kill and forget the channel

DATA_TYPES = frozenset({STDIN, STDOUT, STDERR})

# Operations named by an OPEN's "op", in two namespaces that share no name. The host's
# supervisor answers its own; the guest agent answers the rest. A client (any process
# that can reach a box's ctl.sock) gets the supervisor's operations and, passed through
# to the agent, only CLIENT_AGENT_OPS: the agent's other operations (freeze, thaw,
# shutdown, ...) are steps of supervisor operations and are refused to clients.
SUPERVISOR_OPS = frozenset({"wait_ready", "stop", "pause", "resume", "capture", "release", "suspend", "capture_memory"})
AGENT_OPS = frozenset(
    {"ping", "exec", "put", "get", "sync", "freeze", "thaw", "clock", "shutdown", "reseed", "reidentify"}
)
CLIENT_AGENT_OPS = frozenset({"exec", "put", "get", "clock"})


def pack(channel, ftype, payload=b""):
    return HEADER.pack(len(payload), channel, ftype) + payload


def pack_json(channel, ftype, obj):
    return pack(channel, ftype, json.dumps(obj, separators=(",", ":")).encode())


def pack_credit(channel, amount):
    return pack(channel, CREDIT, CREDIT_FMT.pack(amount))


def unpack_credit(payload):
    return CREDIT_FMT.unpack(payload)[0]


class Decoder:
    """Incremental frame parser: feed bytes, get complete ``(channel, type, payload)`` frames."""

    def __init__(self):
        self._buf = bytearray()

    def feed(self, data):
        self._buf += data
        frames = []
        buf = self._buf
        pos = 0
        while len(buf) - pos >= HEADER.size:
            length, channel, ftype = HEADER.unpack_from(buf, pos)
            if length > MAX_PAYLOAD:
                raise ValueError(f"frame of {length} bytes exceeds the protocol limit")
            end = pos + HEADER.size + length
            if len(buf) < end:
                break
            frames.append((channel, ftype, bytes(buf[pos + HEADER.size : end])))
            pos = end
        del buf[:pos]
        return frames
