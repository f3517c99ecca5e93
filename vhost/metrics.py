"""metrics.py: Prometheus exposition of the devices' per-queue counters (`--metrics-address`).

Owns: turning `DeviceSample`s -- snapshots a caller-supplied `sample_fn` takes, typically
`device_sample(dev, ...)` over `Device.queue_counters()` -- into metric families on a private
CollectorRegistry (`PyvhostCollector`; no process/platform collectors), parsing HOST:PORT
(`parse_address`), and a small HTTP server in daemon threads serving GET /metrics
(`start_metrics_server` -> `MetricsServer`).

Must not: write device state (it only calls sample_fn, which only reads), touch the event loop or
take part in the data path (the workers' counters are plain integers read without locks, so a
scrape may be one request stale), or let a failing sample_fn or a bad sample kill the server (it
is logged and the scrape returns what could be collected).  What each counter means is stated
once, in vhost/device.py (Device.queue_counters) and the devices' queue_counters.
"""
from __future__ import annotations

import logging
import socket
import socketserver
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterable
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from .device import COUNTER_KEYS, Device

log = logging.getLogger("pyvhost.metrics")

QUEUE_LABELS = ("device", "type", "queue")
DEVICE_LABELS = ("device", "type")

# (metric name without _total, COUNTER_KEYS key, unit, help)
COUNTERS = (
    ("pyvhost_requests", "requests", "",
     "Requests (blk) or frames (net) the virtqueue completed."),
    ("pyvhost_read_bytes", "bytes_read", "bytes",
     "Bytes the device read: blk from the backing store into guest memory, net tx frames "
     "from guest memory."),
    ("pyvhost_written_bytes", "bytes_written", "bytes",
     "Bytes the device wrote: blk to the backing store, net rx frames into guest memory."),
    ("pyvhost_errors", "errors", "",
     "Requests or buffers that failed on the virtqueue, plus corrupt avail rings."),
    ("pyvhost_kicks", "kicks", "", "Kicks (frontend to backend notifications) consumed."),
    ("pyvhost_notifications", "notifications", "",
     "Used-buffer notifications (interrupts) sent to the frontend."),
    ("pyvhost_dropped_packets", "dropped", "", "Frames dropped (net; 0 for blk)."),
)
GAUGES = (
    ("pyvhost_inflight_requests", "inflight",
     "Requests submitted to the backing store and not completed yet."),
    ("pyvhost_ring_broken", "broken",
     "1 while the virtqueue's ring is marked broken (corrupt avail ring)."),
)
assert {k for _, k, _, _ in COUNTERS} | {k for _, k, _ in GAUGES} == set(COUNTER_KEYS)

DEFAULT_PORT_HINT = "e.g. 127.0.0.1:9560 or [::1]:9560"
CLOSE_TIMEOUT = 5.0


@dataclass
class DeviceSample:
    """One device at scrape time: `queues` is Device.queue_counters()."""
    name: str
    type: str
    connected: bool
    queues: dict[int, dict[str, int]] = field(default_factory=dict)
    socket: str = ""


def device_sample(device: Device, name: str, *, connected: bool,
                  socket: str = "") -> DeviceSample:
    """A DeviceSample of `device` now (device.queue_counters() is safe from any thread)."""
    return DeviceSample(name=name, type=device.device_type, connected=bool(connected),
                        queues=device.queue_counters(), socket=socket)


class PyvhostCollector(Collector):
    """Builds the pyvhost_* families from `sample_fn()` (an iterable of DeviceSample) at every
    scrape.  A sample_fn that raises, or a sample that is malformed, is logged; the scrape goes
    on with whatever samples were obtained (a device is reported whole or not at all, never
    with made-up zeros that would look like a counter reset)."""

    def __init__(self, sample_fn: Callable[[], Iterable[DeviceSample]]):
        self._sample_fn = sample_fn
        self._failures = 0

    def _samples(self) -> list[DeviceSample]:
        got: list[DeviceSample] = []
        try:
            for s in self._sample_fn():
                got.append(s)
        except Exception as e:
            self._failures += 1
            # the whole traceback once; then one line per failing scrape
            log.error("metrics: collecting device samples failed (%d so far): %s: %s",
                      self._failures, type(e).__name__, e, exc_info=self._failures == 1)
        return got

    def collect(self):
        counters = {key: CounterMetricFamily(name, doc, labels=QUEUE_LABELS, unit=unit)
                    for name, key, unit, doc in COUNTERS}
        gauges = {key: GaugeMetricFamily(name, doc, labels=QUEUE_LABELS)
                  for name, key, doc in GAUGES}
        connected = GaugeMetricFamily("pyvhost_frontend_connected",
                                      "1 while a vhost-user frontend is connected.",
                                      labels=DEVICE_LABELS)
        info = InfoMetricFamily("pyvhost_device", "A device served by pyvhost.",
                                labels=("device", "type", "socket"))
        for s in self._samples():
            try:
                rows = []
                for q in sorted(s.queues):
                    values = s.queues[q]
                    labels = (str(s.name), str(s.type), str(int(q)))
                    rows.append((labels, {k: int(values[k]) for k in COUNTER_KEYS}))
                dev_labels = (str(s.name), str(s.type))
                info_labels = (str(s.name), str(s.type), str(s.socket or ""))
                up = 1 if s.connected else 0
            except Exception as e:
                log.error("metrics: skipping a malformed sample of %r: %s: %s",
                          getattr(s, "name", s), type(e).__name__, e)
                continue
            for labels, values in rows:
                for key, fam in counters.items():
                    fam.add_metric(labels, values[key])
                for key, fam in gauges.items():
                    fam.add_metric(labels, values[key])
            connected.add_metric(dev_labels, up)
            info.add_metric(info_labels, {})
        yield from counters.values()
        yield from gauges.values()
        yield connected
        yield info


def parse_address(text: str) -> tuple[str, int]:
    """Parse "HOST:PORT" into (host, port).  HOST is a name, an IPv4 address or a bracketed IPv6
    address ([::1]:9560); it is required (0.0.0.0 or [::] for all interfaces, said out loud).
    PORT is 0..65535 (0: any free port)."""
    bad = f"bad metrics address {text!r}: expected HOST:PORT ({DEFAULT_PORT_HINT})"
    if not isinstance(text, str):
        raise ValueError(bad)
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":") or ":" not in host:
            raise ValueError(bad)
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or ":" in host:       # an IPv6 address needs brackets
            raise ValueError(bad)
    if not host or any(c.isspace() for c in host):
        raise ValueError(bad)
    if not port_text.isascii() or not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(bad)
    return host, int(port_text)


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _Handler(WSGIRequestHandler):
    def log_message(self, format, *args):         # noqa: A002 - the base class's name
        # per-request lines on stderr would interleave with the service log
        log.debug("metrics: %s %s", self.address_string(), format % args)


class _HTTPServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True          # a stuck scraper never holds up close() or the exit
    allow_reuse_address = True     # rebinding right after close() works despite TIME_WAIT

    def server_bind(self):
        # HTTPServer.server_bind looks our own name up with getfqdn(), a DNS query that can
        # hang for seconds; bind and fill in what WSGIServer needs ourselves.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = port
        self.setup_environ()


class _HTTPServer6(_HTTPServer):
    address_family = socket.AF_INET6


def _wsgi_app(registry: CollectorRegistry):
    metrics = make_wsgi_app(registry)

    def app(environ, start_response):
        path = environ.get("PATH_INFO") or "/"
        if path == "/metrics":
            return metrics(environ, start_response)
        if path == "/":
            start_response("200 OK", [("Content-Type", "text/plain; charset=utf-8")])
            return [b"pyvhost: Prometheus metrics at /metrics\n"]
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
        return [b"not found; try /metrics\n"]

    return app


class MetricsServer:
    """A running metrics HTTP server (see start_metrics_server)."""

    def __init__(self, httpd: _HTTPServer, thread: threading.Thread,
                 registry: CollectorRegistry):
        self._httpd = httpd
        self._thread = thread
        self.registry = registry
        self.host = str(httpd.server_address[0])
        self.port = int(httpd.server_address[1])
        self.address = format_address(self.host, self.port)
        self._closed = False

    def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Stop serving and release the port (idempotent).  shutdown() returns within the
        serve loop's poll interval; request threads are daemons and are not waited for."""
        if self._closed:
            return
        self._closed = True
        try:
            self._httpd.shutdown()
        finally:
            self._httpd.server_close()
            self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("metrics: server thread did not stop within %.1f s", timeout)
        log.info("metrics: stopped serving on %s", self.address)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def start_metrics_server(address: str, sample_fn: Callable[[], Iterable[DeviceSample]]
                         ) -> MetricsServer:
    """Serve GET /metrics on `address` ("HOST:PORT", see parse_address) from a daemon thread,
    each scrape calling `sample_fn()`.  Raises ValueError for a bad address and OSError (naming
    the address) when it cannot listen."""
    host, port = parse_address(address)
    try:
        infos = socket.getaddrinfo(host, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0,
                                   socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise OSError(e.errno, f"metrics address {address}: cannot resolve {host!r}: "
                               f"{e.strerror}") from None
    family, _, _, _, sockaddr = infos[0]
    cls = _HTTPServer6 if family == socket.AF_INET6 else _HTTPServer
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PyvhostCollector(sample_fn))
    try:
        httpd = cls(sockaddr, _Handler)
    except OSError as e:
        raise OSError(e.errno, f"metrics address {address}: cannot listen: "
                               f"{e.strerror or e}") from None
    httpd.set_app(_wsgi_app(registry))
    thread = threading.Thread(target=httpd.serve_forever, kwargs=dict(poll_interval=0.25),
                              name="pyvhost-metrics", daemon=True)
    thread.start()
    server = MetricsServer(httpd, thread, registry)
    log.info("metrics: serving Prometheus metrics on http://%s/metrics", server.address)
    return server
