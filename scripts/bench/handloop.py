#!/usr/bin/env python3
"""The hand-written alternative to the agent's watcher, as a team would write it in an afternoon:
inotify through ctypes on one folder (close_write and moved_to, like the naive loop), and for
every event a restart through supervisord's XML-RPC on its unix socket (stopProcess then
startProcess, which is what `supervisorctl restart` does), without spawning a process per event.
No debounce, no content hashing: one restart per event, like the naive loop.

usage: handloop.py DIR SOCKET PROGRAM
"""

import ctypes
import ctypes.util
import http.client
import os
import socket
import struct
import sys
import xmlrpc.client

IN_CLOSE_WRITE = 0x00000008
IN_MOVED_TO = 0x00000080


class UnixConnection(http.client.HTTPConnection):
    def __init__(self, path):
        super().__init__("localhost", timeout=60)
        self.path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self.path)


class UnixTransport(xmlrpc.client.Transport):
    def __init__(self, path):
        super().__init__()
        self.path = path

    def make_connection(self, host):
        if self._connection and host == self._connection[0]:
            return self._connection[1]
        self._connection = host, UnixConnection(self.path)
        return self._connection[1]


def main():
    folder, sock, program = sys.argv[1:4]
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    fd = libc.inotify_init1(os.O_CLOEXEC)
    if fd < 0 or libc.inotify_add_watch(fd, folder.encode(), IN_CLOSE_WRITE | IN_MOVED_TO) < 0:
        sys.exit(f"inotify: {os.strerror(ctypes.get_errno())}")
    sv = xmlrpc.client.ServerProxy("http://localhost", transport=UnixTransport(sock)).supervisor
    print("ready", file=sys.stderr, flush=True)
    while True:
        buf = os.read(fd, 65536)
        off = 0
        while off < len(buf):
            _wd, _mask, _cookie, length = struct.unpack_from("iIII", buf, off)
            off += 16 + length
            try:
                if sv.getProcessInfo(program)["statename"] in ("RUNNING", "STARTING"):
                    sv.stopProcess(program)
                sv.startProcess(program)
            except (xmlrpc.client.Fault, OSError) as e:
                print(f"restart {program}: {e}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
