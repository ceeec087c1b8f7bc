"""Requests to client-named addresses (service/remote.py): the name is resolved and
checked once, and the request goes to the checked address (no DNS rebinding), with
the name kept for the Host header and for TLS."""

from __future__ import annotations

import http.server
import socket
import ssl
import threading

import httpx
import pytest

from service import remote

REAL_GETADDRINFO = socket.getaddrinfo


class Resolver:
    """socket.getaddrinfo with scripted answers for some names: one list of addresses
    per lookup, the last repeated. Every other name resolves as usual."""

    def __init__(self, answers: dict[str, list[list[str]]]):
        self.answers, self.lookups = answers, []

    def __call__(self, host, port, *args, **kwargs):
        name = host.decode() if isinstance(host, bytes) else host
        if name not in self.answers:
            return REAL_GETADDRINFO(host, port, *args, **kwargs)
        self.lookups.append(name)
        script = self.answers[name]
        addresses = script[min(len(self.lookups) - 1, len(script) - 1)]
        return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "",
                 (a, int(port or 0))) for a in addresses]


@pytest.fixture
def server():
    """An HTTP server on 127.0.0.1 that records what reaches it."""
    seen: list[dict] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            seen.append({"host": self.headers["host"], "path": self.path, "body": body})
            self.send_response(204)
            self.end_headers()

        do_GET = do_POST  # noqa: N815

        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    srv.seen = seen
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.mark.parametrize("address,public", [
    ("8.8.8.8", True), ("2606:4700:4700::1111", True), ("127.0.0.1", False),
    ("10.1.2.3", False), ("192.168.0.1", False), ("169.254.169.254", False),
    ("::1", False), ("fe80::1%eth0", False), ("::ffff:127.0.0.1", False),
    ("0.0.0.0", False), ("224.0.0.1", False)])
def test_is_public(address, public):
    assert remote.is_public(address) is public


def test_a_name_with_any_private_address_is_refused(monkeypatch):
    monkeypatch.setattr(socket, "getaddrinfo",
                        Resolver({"hook.example": [["8.8.8.8", "10.0.0.5"]]}))
    with pytest.raises(remote.AddressRefused, match="private or local"):
        remote.resolve("https://hook.example/h", schemes=("https",), allow_private=False)
    assert remote.resolve("https://hook.example/h", schemes=("https",),
                          allow_private=True) == ["8.8.8.8", "10.0.0.5"]
    with pytest.raises(remote.AddressRefused, match="scheme must be https"):
        remote.resolve("http://hook.example/h", schemes=("https",), allow_private=True)


def test_the_request_goes_to_the_address_checked(monkeypatch, server):
    """The name answers 127.0.0.1 when checked and 127.0.0.2 (nobody listens there)
    afterwards: the request still reaches the server, so it was not looked up again."""
    resolver = Resolver({"hook.example": [["127.0.0.1"], ["127.0.0.2"]]})
    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    url = f"http://hook.example:{server.server_port}/h?x=1"
    with httpx.Client(timeout=5) as client:
        with remote.pinned_stream(client, "POST", url, schemes=("http",),
                                  allow_private=True, content=b"payload") as r:
            assert r.status_code == 204
    assert resolver.lookups == ["hook.example"]
    assert server.seen == [{"host": f"hook.example:{server.server_port}", "path": "/h?x=1",
                            "body": b"payload"}]


def test_a_rebinding_name_cannot_steer_the_request_inside(monkeypatch):
    """Public when checked, loopback a moment later: the request is built for the
    public address (the transport records it and sends nothing)."""
    resolver = Resolver({"hook.example": [["93.184.216.34"], ["127.0.0.1"]]})
    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    sent: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(200)

    with httpx.Client(transport=httpx.MockTransport(record)) as client:
        with remote.pinned_stream(client, "POST", "https://hook.example/h", content=b"x",
                                  schemes=("https",), allow_private=False) as r:
            assert r.status_code == 200
    (req,) = sent
    assert req.url.host == "93.184.216.34" and req.url.scheme == "https"
    assert req.headers["host"] == "hook.example" and req.headers["connection"] == "close"
    assert req.extensions["sni_hostname"] == "hook.example"
    assert resolver.lookups == ["hook.example"]


def test_a_refused_address_falls_back_to_the_next_one(monkeypatch, server):
    monkeypatch.setattr(socket, "getaddrinfo",
                        Resolver({"hook.example": [["127.0.0.2", "127.0.0.1"]]}))
    url = f"http://hook.example:{server.server_port}/h"
    with httpx.Client(timeout=5) as client:
        with remote.pinned_stream(client, "GET", url, schemes=("http",),
                                  allow_private=True) as r:
            assert r.status_code == 204
        assert len(server.seen) == 1
        monkeypatch.setattr(socket, "getaddrinfo",
                            Resolver({"hook.example": [["127.0.0.2"]]}))
        with pytest.raises(httpx.ConnectError):
            with remote.pinned_stream(client, "GET", url, schemes=("http",),
                                      allow_private=True):
                pass


@pytest.mark.parametrize("cert_name,ok", [("hook.example", True), ("other.example", False)])
def test_tls_is_checked_against_the_name_not_the_address(monkeypatch, cert_name, ok):
    """Connected by address, the certificate must still name the URL's host."""
    import trustme

    ca = trustme.CA()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.send_header("content-length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert(cert_name).configure_cert(ctx)
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    monkeypatch.setattr(socket, "getaddrinfo", Resolver({"hook.example": [["127.0.0.1"]]}))
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    url = f"https://hook.example:{srv.server_port}/h"
    try:
        with httpx.Client(verify=client_ctx, timeout=5) as client:
            if ok:
                with remote.pinned_stream(client, "GET", url, schemes=("https",),
                                          allow_private=True) as r:
                    assert r.status_code == 200 and r.read() == b"ok"
            else:
                with pytest.raises(httpx.ConnectError, match="certificate"):
                    with remote.pinned_stream(client, "GET", url, schemes=("https",),
                                              allow_private=True):
                        pass
    finally:
        srv.shutdown()
        srv.server_close()
