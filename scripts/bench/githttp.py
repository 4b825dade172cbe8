#!/usr/bin/env python3
"""git's smart HTTP (git-http-backend as a CGI) on loopback, counting the bytes it sends.

    githttp.py ROOT PORT COUNTFILE

Serves the repositories under ROOT at http://127.0.0.1:PORT/git/NAME.git. After each response
it rewrites COUNTFILE with the total of response body bytes sent so far, so a benchmark reads
what one fetch cost as the difference of two reads. Protocol v2 (the Git-Protocol header) and
gzip-encoded requests are passed to git-http-backend as its CGI environment expects."""

import http.server
import os
import subprocess
import sys
import threading

ROOT, PORT, COUNT = sys.argv[1], int(sys.argv[2]), sys.argv[3]
BACKEND = "/usr/lib/git-core/git-http-backend"
lock = threading.Lock()
total = 0


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.cgi()

    def do_POST(self):
        self.cgi()

    def cgi(self):
        global total
        path, _, query = self.path.partition("?")
        if not path.startswith("/git/"):
            self.send_error(404)
            return
        length = int(self.headers.get("Content-Length") or 0)
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = b""
            while True:
                size = int(self.rfile.readline().strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    break
                body += self.rfile.read(size)
                self.rfile.readline()
        else:
            body = self.rfile.read(length) if length else b""
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "GIT_PROJECT_ROOT": ROOT,
            "GIT_HTTP_EXPORT_ALL": "1",
            "REQUEST_METHOD": self.command,
            "PATH_INFO": path[len("/git"):],
            "QUERY_STRING": query,
            "CONTENT_TYPE": self.headers.get("Content-Type", ""),
            "CONTENT_LENGTH": str(len(body)),
            "REMOTE_ADDR": "127.0.0.1",
        }
        if self.headers.get("Content-Encoding"):
            env["HTTP_CONTENT_ENCODING"] = self.headers["Content-Encoding"]
        if self.headers.get("Git-Protocol"):
            env["GIT_PROTOCOL"] = self.headers["Git-Protocol"]
        out = subprocess.run([BACKEND], input=body, env=env, capture_output=True, timeout=300).stdout
        head, _, content = out.partition(b"\r\n\r\n")
        if not _:
            head, _, content = out.partition(b"\n\n")
        status, headers = 200, []
        for line in head.decode("latin-1").splitlines():
            name, _, value = line.partition(":")
            if name.lower() == "status":
                status = int(value.split()[0])
            elif name:
                headers.append((name, value.strip()))
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(content)))
        self.end_headers()
        self.wfile.write(content)
        with lock:
            total += len(content)
            tmp = COUNT + ".tmp"
            with open(tmp, "w") as f:
                f.write(f"{total}\n")
            os.replace(tmp, COUNT)


with open(COUNT, "w") as f:
    f.write("0\n")
http.server.ThreadingHTTPServer(("127.0.0.1", PORT), Handler).serve_forever()
