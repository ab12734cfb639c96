"""Which network addresses a media URL may reach (SSRF protection).

A URL's host is resolved once, here; every address it resolves to must be public (not loopback,
private, link-local, CGNAT, multicast, reserved or unspecified, also when hidden inside an IPv6
form: IPv4-mapped, 6to4, Teredo, NAT64), and the fetch then connects to the address that was
checked, so a second DNS answer cannot send it elsewhere. Numeric spellings such as 2130706433 or
0x7f000001 resolve to 127.0.0.1 and are refused like it. Hosts the operator lists in
--allowed-media-domains skip the address check: that is how an internal media store is allowed
(an entry with a port, `media.internal:8080`, allows that port of the host only: an allowed
internal host's other services stay out of reach). The same rules guard webhook URLs.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
from typing import Any

import httpx

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

CGNAT = ipaddress.ip_network("100.64.0.0/10")
# IETF protocol assignments (IANA: not globally reachable, but for two anycast addresses no
# image is on); Python before 3.11.10 and 3.12.4 calls most of it global.
IETF_PROTOCOL = ipaddress.ip_network("192.0.0.0/24")
NAT64 = ipaddress.ip_network("64:ff9b::/96")


# Refusals name the flag that allows what was refused, so an operator knows what to change.
ALLOW_HINT = " (the server's --allowed-media-domains flag can allow a host)"


class AddressRefused(Exception):
    """The host resolves to an address media fetches may not reach (or does not resolve)."""


class HostUnresolved(AddressRefused):
    """The host does not resolve (now, at least)."""


def embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if ip in NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def is_public(ip: IPAddress) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and (inner := embedded_ipv4(ip)) is not None:
        return is_public(inner)
    if ip.is_multicast or ip.is_unspecified or ip.is_reserved or ip.is_loopback:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local:  # fec0::/10, deprecated
        return False
    if isinstance(ip, ipaddress.IPv4Address) and (ip in CGNAT or ip in IETF_PROTOCOL):
        return False
    return ip.is_global


def host_is_allowed(host: str, port: int, allowed_hosts: tuple[str, ...]) -> bool:
    """Listed as a host (any port), or as host:port (an IPv6 address in brackets); an
    address in its canonical form, as the allow-list has it ([fd00:0::5] is fd00::5)."""
    name = host.lower().rstrip(".").removeprefix("[").removesuffix("]")
    with contextlib.suppress(ValueError):
        name = str(ipaddress.ip_address(name))
    entries = {entry.lower().rstrip(".") for entry in allowed_hosts}
    return name in entries or f"{bracketed(name)}:{port}" in entries


def bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def default_port(url: httpx.URL) -> int:
    return url.port if url.port is not None else 443 if url.scheme == "https" else 80


def _private(host: str) -> AddressRefused:
    # (one wording whether the address was written in the URL or found by DNS: a job refused
    # at submission says what the same request answered synchronously)
    return AddressRefused(
        f"the host {host} resolves to a private, loopback or reserved address{ALLOW_HINT}"
    )


def _literal_address(host: str) -> IPAddress | None:
    """The address a host written as a number stands for: the usual forms, and the old IPv4
    spellings (127.1, 2130706433, 0x7f000001, 0) that resolvers still read as addresses."""
    with contextlib.suppress(ValueError):
        return ipaddress.ip_address(host.strip("[]"))
    if ":" in host:
        return None
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except OSError:
        return None


def _not_listed(host: str, port: int, allowed_hosts: tuple[str, ...]) -> AddressRefused:
    ports = [e for e in allowed_hosts if e.lower().startswith(f"{bracketed(host.lower())}:")]
    where = f"port {port} of the host {host}" if ports else f"the host {host}"
    return AddressRefused(f"{where} is not in the server's allow-list{ALLOW_HINT}")


def check_url_statically(url: str, allowed_hosts: tuple[str, ...]) -> None:
    """What can be refused without DNS: a malformed URL, a scheme other than http(s), a host off
    the allow-list, a literal private address. Raises AddressRefused. The resolved address is
    still checked when the URL is used."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise AddressRefused(f"the URL is malformed ({exc})") from None
    if parsed.scheme not in ("http", "https"):
        raise AddressRefused(f"the scheme {parsed.scheme or '(none)'} is not http(s)")
    host = parsed.raw_host.decode("ascii")
    if not host:
        raise AddressRefused("the URL has no host")
    port = default_port(parsed)
    listed = host_is_allowed(host, port, allowed_hosts)
    if allowed_hosts and not listed:
        raise _not_listed(host, port, allowed_hosts)
    literal = _literal_address(host)
    if literal is not None and not listed and not is_public(literal):
        raise _private(host)


async def resolve_checked(host: str, port: int, allowed_hosts: tuple[str, ...]) -> str:
    """The address to connect to for host: resolved once and checked.

    With an allow-list, only listed hosts pass (whatever they resolve to); without one, any host
    whose every address is public."""
    listed = host_is_allowed(host, port, allowed_hosts)
    if allowed_hosts and not listed:
        raise _not_listed(host, port, allowed_hosts)
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except UnicodeError:  # (a label past 63 characters, an empty one: no DNS name at all)
        raise AddressRefused(f"the host {host} is malformed: not a DNS name") from None
    except OSError:
        raise HostUnresolved(f"the host {host} does not resolve") from None
    addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
    if not addresses:
        raise HostUnresolved(f"the host {host} does not resolve")
    if not listed and not all(is_public(ip) for ip in addresses):
        raise _private(host)
    return str(addresses[0])


async def checked_request(
    client: httpx.AsyncClient,
    method: str,
    url: httpx.URL,
    allowed_hosts: tuple[str, ...],
    **kwargs: Any,
) -> httpx.Request:
    """A request to exactly the address resolve_checked approved: the URL's host is replaced by
    that address, the Host header and TLS SNI keep the name (its IDNA form, as DNS saw it)."""
    if url.scheme not in ("http", "https"):
        raise AddressRefused(f"the scheme {url.scheme or '(none)'} is not http(s)")
    host = url.raw_host.decode("ascii")
    port = default_port(url)
    address = await resolve_checked(host, port, allowed_hosts)
    headers = {**kwargs.pop("headers", {}), "Host": url.netloc.decode("ascii")}
    extensions = {"sni_hostname": host} if url.scheme == "https" else {}
    return client.build_request(
        method, url.copy_with(host=address), headers=headers, extensions=extensions, **kwargs
    )
