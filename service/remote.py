"""Talking to addresses clients name: webhook receivers and https image inputs.

A client-supplied URL must not reach the service's own network (SSRF): every address
its host resolves to must be public, unless the operator allows private ones
(WEBHOOK_ALLOW_PRIVATE / INPUT_URL_ALLOW_PRIVATE, e.g. for tests or an internal
deployment). Redirects are followed by hand, each hop checked again, and the address
actually connected to is checked before a response body is read.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
import socket
from urllib.parse import urljoin, urlsplit

import httpx

__all__ = ["AddressRefused", "FetchError", "check_url", "fetch_url", "decode_data_uri",
           "is_public"]

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
    if allow_private:
        return host
    try:
        infos = socket.getaddrinfo(host, port or (443 if parts.scheme == "https" else 80),
                                   type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise AddressRefused(f"host {host} does not resolve") from None
    if not infos or not all(is_public(i[4][0]) for i in infos):
        raise AddressRefused(f"host {host} resolves to a private or local address")
    return host


def _peer(response: httpx.Response) -> str | None:
    stream = response.extensions.get("network_stream")
    addr = stream.get_extra_info("server_addr") if stream is not None else None
    return addr[0] if addr else None


def fetch_url(url: str, *, max_bytes: int, timeout_s: float, allow_private: bool,
              hosts: frozenset[str]) -> bytes:
    """The body of an https URL whose host is in `hosts`, at most `max_bytes`, within
    `timeout_s` per request, following at most MAX_REDIRECTS checked redirects."""
    with httpx.Client(timeout=timeout_s, follow_redirects=False) as client:
        for _ in range(MAX_REDIRECTS + 1):
            check_url(url, schemes=("https",), allow_private=allow_private, hosts=hosts)
            try:
                with client.stream("GET", url) as r:
                    peer = _peer(r)
                    if not allow_private and peer is not None and not is_public(peer):
                        raise AddressRefused("the host connected to a private address")
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
