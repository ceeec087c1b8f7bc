"""Talking to addresses clients name: webhook receivers and https image inputs.

A client-supplied URL must not reach the service's own network (SSRF): every address
its host resolves to must be public, unless the operator allows private ones
(WEBHOOK_ALLOW_PRIVATE / INPUT_URL_ALLOW_PRIVATE, e.g. for tests or an internal
deployment). The name is resolved once and the request is sent to an address that
was checked (`pinned_stream`), with the name kept for the Host header and for TLS (SNI
and certificate): a name that resolves to a public address when checked and to a
private one a moment later (DNS rebinding) cannot steer the request inside. Redirects
are followed by hand, each hop checked and pinned again.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urljoin, urlsplit

import httpx

__all__ = ["AddressRefused", "FetchError", "check_url", "fetch_url", "decode_data_uri",
           "is_public", "pinned_stream", "resolve"]

MAX_REDIRECTS = 3


class AddressRefused(ValueError):
    """The URL's host is not allowed or resolves to a private address."""


class FetchError(ValueError):
    """The URL could not be fetched within the limits."""


def is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return not (ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast
                or ip.is_reserved or ip.is_unspecified)


def check_url(url: str, *, schemes: tuple[str, ...], allow_private: bool,
              hosts: frozenset[str] | None = None) -> str:
    """The URL's host, once the URL is well formed, its scheme allowed, its host in
    `hosts` (when given) and every address it resolves to public (unless
    `allow_private`). Raises AddressRefused with a client-readable reason."""
    host, port = _parse(url, schemes=schemes, hosts=hosts)
    if not allow_private:
        _addresses(host, port, allow_private=False)
    return host


def resolve(url: str, *, schemes: tuple[str, ...], allow_private: bool,
            hosts: frozenset[str] | None = None) -> list[str]:
    """The addresses to connect to for `url`, in the resolver's order, after the checks
    of `check_url` (every one public unless `allow_private`)."""
    host, port = _parse(url, schemes=schemes, hosts=hosts)
    return _addresses(host, port, allow_private=allow_private)


def _parse(url: str, *, schemes: tuple[str, ...],
           hosts: frozenset[str] | None) -> tuple[str, int]:
    """The URL's host and port, once it is well formed, its scheme allowed and its host
    in `hosts` (when given)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise AddressRefused("not a valid URL") from None
    if parts.scheme not in schemes:
        raise AddressRefused(f"the scheme must be {' or '.join(schemes)}")
    host = (parts.hostname or "").lower()
    if not host:
        raise AddressRefused("the URL has no host")
    if parts.username or parts.password:
        raise AddressRefused("credentials in the URL are not accepted")
    if hosts is not None and host not in hosts:
        raise AddressRefused(f"host {host} is not in the allowed list")
    return host, port or (443 if parts.scheme == "https" else 80)


def _addresses(host: str, port: int, *, allow_private: bool) -> list[str]:
    """The host's addresses, each public unless `allow_private`."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise AddressRefused(f"host {host} does not resolve") from None
    addresses = list(dict.fromkeys(str(i[4][0]) for i in infos))
    if not addresses or not (allow_private or all(is_public(a) for a in addresses)):
        raise AddressRefused(f"host {host} resolves to a private or local address")
    return addresses


@contextmanager
def pinned_stream(client: httpx.Client, method: str, url: str, *,
                  schemes: tuple[str, ...], allow_private: bool,
                  hosts: frozenset[str] | None = None, **kwargs) -> Iterator[httpx.Response]:
    """`client.stream(method, url, ...)` sent to the addresses `resolve` checked, tried
    in order while the connection is refused (nothing has been sent then), never to
    an address looked up afresh. Raises AddressRefused before connecting anywhere."""
    addresses = resolve(url, schemes=schemes, allow_private=allow_private, hosts=hosts)
    target = httpx.URL(url)
    # The pool knows the connection by address only: closing it keeps a connection
    # whose TLS proved one name from carrying a request for another name later.
    headers = {**kwargs.pop("headers", {}), "host": target.netloc.decode("ascii"),
               "connection": "close"}
    extensions = {"sni_hostname": target.raw_host.decode("ascii")}
    response = None
    for address in addresses:
        request = client.build_request(method, target.copy_with(host=address),
                                       headers=headers, extensions=extensions, **kwargs)
        try:
            response = client.send(request, stream=True)
            break
        except httpx.ConnectError:
            if address == addresses[-1]:
                raise
    try:
        yield response
    finally:
        response.close()


def fetch_url(url: str, *, max_bytes: int, timeout_s: float, allow_private: bool,
              hosts: frozenset[str]) -> bytes:
    """The body of an https URL whose host is in `hosts`, at most `max_bytes`, within
    `timeout_s` per request, following at most MAX_REDIRECTS checked redirects."""
    with httpx.Client(timeout=timeout_s, follow_redirects=False) as client:
        for _ in range(MAX_REDIRECTS + 1):
            try:
                with pinned_stream(client, "GET", url, schemes=("https",),
                                   allow_private=allow_private, hosts=hosts) as r:
                    if r.is_redirect:
                        url = urljoin(url, r.headers.get("location", ""))
                        continue
                    if r.status_code != 200:
                        raise FetchError(f"the server answered HTTP {r.status_code}")
                    declared = r.headers.get("content-length", "")
                    if declared.isdigit() and int(declared) > max_bytes:
                        raise FetchError(f"over the {max_bytes}-byte limit")
                    data = bytearray()
                    for chunk in r.iter_bytes():
                        data += chunk
                        if len(data) > max_bytes:
                            raise FetchError(f"over the {max_bytes}-byte limit")
                    return bytes(data)
            except httpx.TimeoutException:
                raise FetchError(f"no answer within {timeout_s:g} s") from None
            except httpx.HTTPError as e:
                raise FetchError(f"could not be fetched ({type(e).__name__})") from None
    raise FetchError(f"more than {MAX_REDIRECTS} redirects")


_DATA_URI = re.compile(r"data:(?P<type>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)"
                       r"(?P<b64>;base64)?,(?P<data>.*)", re.DOTALL)


def decode_data_uri(uri: str, max_bytes: int) -> bytes:
    """The bytes of a base64 `data:` URI (the media type is not trusted: the image is
    decoded and checked like an upload)."""
    m = _DATA_URI.fullmatch(uri)
    if m is None or not m.group("b64"):
        raise FetchError("not a base64 data: URI (data:image/png;base64,...)")
    payload = m.group("data")
    if len(payload) > (max_bytes * 4) // 3 + 4:
        raise FetchError(f"over the {max_bytes}-byte limit")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise FetchError("the base64 payload is not valid") from None
