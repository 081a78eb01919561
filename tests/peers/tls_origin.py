"""A misbehaving mutual-TLS origin on 127.0.0.1 (stdlib only), for what nginx will not do:
  --mode slow   answer after --delay seconds
  --mode close  read the request head, then close without answering
  --mode stall  accept TCP and never start TLS
  --mode late-handshake  wait --delay seconds before the TLS handshake, then answer at once
  --mode huge-head  answer with a response head of --head-mb MB (many header fields)
  --plain       plain HTTP instead of mutual TLS (for an internal upstream)
Each request head received is appended to --record. Prints 'LISTENING <port>'."""

from __future__ import annotations

import argparse
import socket
import ssl
import sys
import threading
import time
from pathlib import Path


def serve(conn: socket.socket, args: argparse.Namespace, ctx: ssl.SSLContext) -> None:
    try:
        if args.mode == "stall":
            time.sleep(60)
            return
        if args.mode == "late-handshake":
            time.sleep(args.delay)
        tls = conn if args.plain else ctx.wrap_socket(conn, server_side=True)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = tls.recv(65536)
            if not chunk:
                return
            data += chunk
        with args.record.open("ab") as f:
            f.write(data.split(b"\r\n", 1)[0] + b"\n")
        if args.mode == "close":
            tls.close()
            return
        if args.mode == "huge-head":
            tls.sendall(b"HTTP/1.1 200 OK\r\n")
            field = b"X-Filler-%07d: " + b"v" * 1000 + b"\r\n"
            for i in range(int(args.head_mb * 1024 * 1024) // len(field)):
                tls.sendall(field % i)
            tls.sendall(b"Content-Length: 2\r\n\r\nok")
            time.sleep(5)
            return
        if args.mode == "late-handshake":
            tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nlate")
            time.sleep(30)  # keep-alive: the connection stays open until the client closes it
            return
        time.sleep(args.delay)
        tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nslow")
        tls.close()
    except (OSError, ssl.SSLError):
        pass
    finally:
        conn.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--mode", choices=["slow", "close", "stall", "late-handshake", "huge-head"], required=True
    )
    parser.add_argument("--plain", action="store_true")
    parser.add_argument("--head-mb", type=float, default=10)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--client-ca", required=True)
    parser.add_argument("--delay", type=float, default=5)
    parser.add_argument("--record", type=Path, required=True)
    args = parser.parse_args()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(args.cert, args.key)
    ctx.load_verify_locations(args.client_ca)
    ctx.verify_mode = ssl.CERT_REQUIRED
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(4096)
    print(f"LISTENING {listener.getsockname()[1]}", flush=True)
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=serve, args=(conn, args, ctx), daemon=True).start()


if __name__ == "__main__":
    sys.exit(main())
