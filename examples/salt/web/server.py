#!/usr/bin/python3
"""The example web program: answers / with the greeting from the config repository (read once at
start, so a change needs the restart stackless-init's watcher does), /state with what salt wrote,
/starts with how many times it has started."""
import http.server
import os
import sys

CONFIG = "/var/lib/stackless/repos/config/current/web/greeting.txt"
STATE = "/etc/web/state.txt"
STARTS = "/var/lib/web-starts"
PORT = 8080


def read(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError as e:
        return f"unreadable: {e}"


greeting = read(CONFIG)
if not greeting:
    # A configuration it cannot run with: it refuses to start (the agent reverts such a commit).
    sys.exit(f"web: the greeting in {CONFIG} is empty; refusing to start")
with open(STARTS, "a") as f:
    f.write(f"{os.getpid()}\n")


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/":
            body = greeting
        elif self.path == "/state":
            body = read(STATE)
        elif self.path == "/starts":
            body = str(len(read(STARTS).split()))
        else:
            self.send_error(404)
            return
        data = (body + "\n").encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


http.server.ThreadingHTTPServer(("0.0.0.0", PORT), Handler).serve_forever()
