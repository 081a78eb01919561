"""An upstream on 127.0.0.1 that records every byte it receives, per connection, and answers
each request `200 ok`: mutual TLS with --cert/--key/--client-ca, plain HTTP without.

Each read is appended to --record as {"conn": N, "data": BASE64}, each end of a connection as
{"conn": N, "end": "eof" | "reset"}. With --body-bytes N the answer's body is N bytes of "x".
Prints 'LISTENING <port>'.
"""

from __future__ import annotations

import argparse
import base64
import itertools
import json
import re
import socket
import ssl
import sys
import threading
from pathlib import Path
from typing import Any

ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
_LOCK = threading.Lock()


def record(path: Path, **fields: Any) -> None:
    with _LOCK, path.open("a") as f:
        f.write(json.dumps(fields) + "\n")


def answer(size: int | None) -> bytes:
    if size is None:
        return ANSWER
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + b"x" * size


def complete(buffer: bytes) -> int:
    """The length of the first whole request in buffer, or 0 (Content-Length or chunked)."""
    head_end = buffer.find(b"\r\n\r\n")
    if head_end < 0:
        return 0
    head, start = buffer[:head_end], head_end + 4
    length = re.search(rb"(?im)^content-length: *(\d+)", head)
    if length:
        end = start + int(length.group(1))
        return end if len(buffer) >= end else 0
    if re.search(rb"(?im)^transfer-encoding: *chunked", head):
        last = buffer.find(b"\r\n0\r\n\r\n", start - 2)
        return last + 7 if last >= 0 else 0
    return start


def serve(
    conn: socket.socket, n: int, args: argparse.Namespace, ctx: ssl.SSLContext | None
) -> None:
    end = "eof"
    try:
        sock = ctx.wrap_socket(conn, server_side=True) if ctx is not None else conn
        buffer = b""
        while True:
            data = sock.recv(65536)
            if not data:
                break
            record(args.record, conn=n, data=base64.b64encode(data).decode())
            buffer += data
            while (size := complete(buffer)) > 0:
                buffer = buffer[size:]
                sock.sendall(answer(args.body_bytes))
    except (OSError, ssl.SSLError):
        end = "reset"
    finally:
        record(args.record, conn=n, end=end)
        conn.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--record", type=Path, required=True)
    parser.add_argument("--cert")
    parser.add_argument("--key")
    parser.add_argument("--client-ca")
    parser.add_argument("--body-bytes", type=int)
    args = parser.parse_args()
    ctx = None
    if args.cert:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(args.cert, args.key)
        ctx.load_verify_locations(args.client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(256)
    print(f"LISTENING {listener.getsockname()[1]}", flush=True)
    for n in itertools.count(1):
        conn, _ = listener.accept()
        threading.Thread(target=serve, args=(conn, n, args, ctx), daemon=True).start()


if __name__ == "__main__":
    sys.exit(main())
