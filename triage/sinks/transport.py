"""The sinks' HTTP transport: every socket operation of a request ends by its delivery's deadline.

httpcore takes a request's read timeout once per wait for the answer's headers and then applies
it to every read until the header block is whole, so a target sending its headers a byte at a
time (each within the timeout) would hold a request indefinitely; a `timeout` extension cut to
the time left (TimeLeft) cannot help once the wait has begun. Here the network streams under
httpcore's connection pool cap each connect, TLS handshake, read and write at the time left
before the deadline `ending_by` sets for the calling thread (httpx's sync client does its I/O on
the thread that sends), and raise httpcore's timeout once none is left; httpx turns that into
its own `ReadTimeout` and the like, as it does for any timeout.

httpx's `HTTPTransport` takes no network backend, so this is a transport of its own: the
connection pool (or proxy) httpx would build, with the same TLS context, limits and proxies
from the environment, and httpcore's exceptions mapped as httpx maps them.
"""

from __future__ import annotations

import ipaddress
import typing
import urllib.request
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from time import monotonic

import httpcore
import httpx

# The deadline (`time.monotonic()`'s clock) of the request the current thread is making.
_deadline: ContextVar[float | None] = ContextVar("sink_request_deadline", default=None)


@contextmanager
def ending_by(deadline: float) -> Iterator[None]:
    """The requests made by this thread inside the block end by `deadline`, headers included."""
    token = _deadline.set(deadline)
    try:
        yield
    finally:
        _deadline.reset(token)


def _capped(timeout: float | None, expired: type[Exception]) -> float | None:
    deadline = _deadline.get()
    if deadline is None:
        return timeout
    left = deadline - monotonic()
    if left <= 0:
        raise expired("the request's deadline has passed")
    return left if timeout is None else min(timeout, left)


class _DeadlineStream(httpcore.NetworkStream):
    def __init__(self, stream: httpcore.NetworkStream) -> None:
        self._stream = stream

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._stream.read(max_bytes, _capped(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._stream.write(buffer, _capped(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._stream.close()

    def start_tls(
        self,
        ssl_context: typing.Any,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        # The socket's timeout bounds the whole handshake (CPython's do_handshake counts it
        # down), so capping it once is enough.
        timeout = _capped(timeout, httpcore.ConnectTimeout)
        return _DeadlineStream(self._stream.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> typing.Any:
        return self._stream.get_extra_info(info)


class _DeadlineBackend(httpcore.NetworkBackend):
    def __init__(self) -> None:
        self._backend = httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[typing.Any] | None = None,
    ) -> httpcore.NetworkStream:
        timeout = _capped(timeout, httpcore.ConnectTimeout)
        stream = self._backend.connect_tcp(host, port, timeout, local_address, socket_options)
        return _DeadlineStream(stream)

    def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[typing.Any] | None = None,
    ) -> httpcore.NetworkStream:
        timeout = _capped(timeout, httpcore.ConnectTimeout)
        return _DeadlineStream(self._backend.connect_unix_socket(path, timeout, socket_options))

    def sleep(self, seconds: float) -> None:
        self._backend.sleep(seconds)


# httpcore's exceptions as httpx's own transport maps them (httpx/_transports/default.py):
# the most specific first.
_EXCEPTIONS: tuple[tuple[type[Exception], type[httpx.TransportError]], ...] = (
    (httpcore.ConnectTimeout, httpx.ConnectTimeout),
    (httpcore.ReadTimeout, httpx.ReadTimeout),
    (httpcore.WriteTimeout, httpx.WriteTimeout),
    (httpcore.PoolTimeout, httpx.PoolTimeout),
    (httpcore.TimeoutException, httpx.TimeoutException),
    (httpcore.ConnectError, httpx.ConnectError),
    (httpcore.ReadError, httpx.ReadError),
    (httpcore.WriteError, httpx.WriteError),
    (httpcore.NetworkError, httpx.NetworkError),
    (httpcore.ProxyError, httpx.ProxyError),
    (httpcore.UnsupportedProtocol, httpx.UnsupportedProtocol),
    (httpcore.LocalProtocolError, httpx.LocalProtocolError),
    (httpcore.RemoteProtocolError, httpx.RemoteProtocolError),
    (httpcore.ProtocolError, httpx.ProtocolError),
)


@contextmanager
def _as_httpx_errors() -> Iterator[None]:
    try:
        yield
    except Exception as exc:
        for theirs, ours in _EXCEPTIONS:
            if isinstance(exc, theirs):
                raise ours(str(exc)) from exc
        raise


class _ResponseStream(httpx.SyncByteStream):
    def __init__(self, stream: Iterable[bytes]) -> None:
        self._stream = stream

    def __iter__(self) -> Iterator[bytes]:
        with _as_httpx_errors():
            yield from self._stream

    def close(self) -> None:
        close = getattr(self._stream, "close", None)
        if close is not None:
            close()


class DeadlineTransport(httpx.BaseTransport):
    """httpx's HTTP/1.1 transport (TLS verified, default limits) to one proxy or none, over
    streams that end by the deadline `ending_by` sets."""

    def __init__(self, proxy: httpx.Proxy | None = None) -> None:
        pool_options: dict[str, typing.Any] = {
            # As httpx.Client builds its transport by default: certificates verified (from
            # SSL_CERT_FILE / SSL_CERT_DIR if set, else certifi's), its default limits.
            "ssl_context": httpx.create_ssl_context(),
            "max_connections": 100,
            "max_keepalive_connections": 20,
            "keepalive_expiry": 5.0,
            "network_backend": _DeadlineBackend(),
        }
        self._pool: httpcore.ConnectionPool
        if proxy is None:
            self._pool = httpcore.ConnectionPool(**pool_options)
            return
        proxy_url = httpcore.URL(
            scheme=proxy.url.raw_scheme,
            host=proxy.url.raw_host,
            port=proxy.url.port,
            target=proxy.url.raw_path,
        )
        if proxy.url.scheme in ("http", "https"):
            self._pool = httpcore.HTTPProxy(
                proxy_url=proxy_url,
                proxy_auth=proxy.raw_auth,
                proxy_headers=proxy.headers.raw,
                proxy_ssl_context=proxy.ssl_context,
                **pool_options,
            )
        elif proxy.url.scheme in ("socks5", "socks5h"):
            self._pool = httpcore.SOCKSProxy(
                proxy_url=proxy_url, proxy_auth=proxy.raw_auth, **pool_options
            )
        else:
            raise ValueError(f"proxy {proxy.url.scheme}:// is not http, https, socks5 or socks5h")

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        assert isinstance(request.stream, httpx.SyncByteStream)
        core_request = httpcore.Request(
            method=request.method,
            url=httpcore.URL(
                scheme=request.url.raw_scheme,
                host=request.url.raw_host,
                port=request.url.port,
                target=request.url.raw_path,
            ),
            headers=request.headers.raw,
            content=request.stream,
            extensions=request.extensions,
        )
        with _as_httpx_errors():
            response = self._pool.handle_request(core_request)
        assert isinstance(response.stream, Iterable)
        return httpx.Response(
            status_code=response.status,
            headers=response.headers,
            stream=_ResponseStream(response.stream),
            extensions=response.extensions,
        )

    def close(self) -> None:
        self._pool.close()


def environment_mounts() -> dict[str, httpx.BaseTransport | None]:
    """The proxies the environment names (HTTP_PROXY, HTTPS_PROXY, ALL_PROXY, NO_PROXY), as
    `httpx.Client` mounts them when it builds its own transports (httpx/_utils.py,
    get_environment_proxies): a client given a transport of its own reads none of them."""
    return {
        pattern: None if proxy is None else DeadlineTransport(httpx.Proxy(proxy))
        for pattern, proxy in _environment_proxies().items()
    }


def _environment_proxies() -> dict[str, str | None]:
    found = urllib.request.getproxies()
    proxies: dict[str, str | None] = {}
    for scheme in ("http", "https", "all"):
        if found.get(scheme):
            url = found[scheme]
            proxies[f"{scheme}://"] = url if "://" in url else f"http://{url}"
    for host in (name.strip() for name in found.get("no", "").split(",")):
        # As curl reads NO_PROXY: ".example.com" spares its subdomains, "example.com" also
        # itself. None: sent directly, through the client's own transport.
        if host == "*":
            return {}
        if not host:
            continue
        if "://" in host:
            proxies[host] = None
        elif _is_ip(host, ipaddress.IPv4Address) or host.lower() == "localhost":
            proxies[f"all://{host}"] = None
        elif _is_ip(host, ipaddress.IPv6Address):
            proxies[f"all://[{host}]"] = None
        else:
            proxies[f"all://*{host}"] = None
    return proxies


def _is_ip(host: str, kind: type[ipaddress.IPv4Address | ipaddress.IPv6Address]) -> bool:
    try:
        kind(host.split("/")[0])
    except ValueError:
        return False
    return True
