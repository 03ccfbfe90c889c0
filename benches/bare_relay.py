"""The floor of a broadcast: a relay with no protocol, no checksum and no rename.

    bare_relay.py relay ADDR PORT DEST [NEXT...]   take one stream on ADDR:PORT, write it to
                                                   DEST ("-": nowhere), send it on to each NEXT
    bare_relay.py send SRC PORT HOST...            send the file SRC to each HOST at PORT

Each byte is received, written and sent again from one reused buffer, as a node of
clusterfs's copy tree must at least do; benches/broadcast.sh times it beside clusterfs.
"""
import os
import socket
import sys
import time

CHUNK = 1 << 20


def connect(host, port):
    """Connects to HOST:PORT, waiting up to 10 s for its relay to listen."""
    for _ in range(100):
        try:
            return socket.create_connection((host, port))
        except ConnectionRefusedError:
            time.sleep(0.1)
    return socket.create_connection((host, port))


def pump(read_into, dest, outs):
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    while True:
        n = read_into(buf)
        if not n:
            break
        if dest is not None:
            os.write(dest, view[:n])
        for out in outs:
            out.sendall(view[:n])
    for out in outs:
        out.close()


def main(mode, *args):
    if mode == "relay":
        addr, port, dest, nexts = args[0], int(args[1]), args[2], args[3:]
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind((addr, port))
        server.listen(1)
        conn, _ = server.accept()
        outs = [connect(n, port) for n in nexts]
        fd = None if dest == "-" else os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        pump(conn.recv_into, fd, outs)
        if fd is not None:
            os.close(fd)
    elif mode == "send":
        src, port, hosts = args[0], int(args[1]), args[2:]
        outs = [connect(h, port) for h in hosts]
        with open(src, "rb") as f:
            pump(f.readinto, None, outs)
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(*sys.argv[1:])
