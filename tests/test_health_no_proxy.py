"""`gateway health` asks the admin endpoint directly: an HTTP(S)_PROXY in the environment (common on
corporate hosts and CI runners) must not send the probe, or anything, to another address."""

from __future__ import annotations

import http.server
import os
import socket
import subprocess
import sys
import threading


class _Ok(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b'{"alive": true}'
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_health_ignores_proxy_variables() -> None:
    admin = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Ok)
    threading.Thread(target=admin.serve_forever, daemon=True).start()
    proxy = socket.socket()
    proxy.bind(("127.0.0.1", 0))
    proxy.listen(8)
    proxy.settimeout(0.5)
    proxy_url = f"http://127.0.0.1:{proxy.getsockname()[1]}"
    try:
        env = {**os.environ, "http_proxy": proxy_url, "HTTP_PROXY": proxy_url, "no_proxy": "", "NO_PROXY": ""}
        done = subprocess.run([sys.executable, "-m", "gateway.cli", "health", "--admin",
                               f"127.0.0.1:{admin.server_address[1]}", "--timeout", "5"],
                              capture_output=True, text=True, timeout=60, env=env)
        try:
            conn, _ = proxy.accept()
            conn.close()
            used_proxy = True
        except TimeoutError:
            used_proxy = False
        assert not used_proxy, "the probe went to the proxy"
        assert done.returncode == 0, done.stdout + done.stderr
    finally:
        admin.shutdown()
        admin.server_close()
        proxy.close()
