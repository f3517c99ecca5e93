"""service.py: one process serving many devices: `pyvhost serve --config FILE`, and the runtime
behind the single-device programs pyvhost-blk / pyvhost-net (their command lines become a
one-device configuration).

Owns the lifecycle of a set of devices: build each from its spec through its device type
(devices.TYPES; each type's DeviceEnv holds what its devices share, e.g. net's switches), give
each its own Server (its own socket, its own queue workers), systemd
integration (READY/STATUS/WATCHDOG/STOPPING/RELOADING notifications, socket activation by
LISTEN_FDNAMES = device name), the metrics endpoint, signals (SIGTERM/SIGINT: stop accepting,
let in-flight I/O complete within stop-timeout, close sockets, exit 0; SIGHUP: re-read the file,
start added devices, stop removed ones, restart changed ones, leave the rest untouched), and
the control API's socket when configured (its methods: service_control.py).

Must not: parse TOML (config.py), speak vhost-user (protocol.py), touch a ring (cython_ext),
or know what a device type is beyond its DeviceType hooks.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from dataclasses import dataclass, field

import devices

from . import config as cfg
from . import logfmt
from .devtype import DeviceEnv
from .sdnotify import Notifier, listen_fds, socket_path_of
from .protocol import Limits
from .server import Server, ServerError, default_loop_name, running_loop

log = logging.getLogger("pyvhost.service")

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


class StartError(Exception):
    """A device could not be built or its socket could not listen; str() is the one line."""


@dataclass
class DeviceRuntime:
    spec: object
    device: object
    server: Server
    task: asyncio.Task | None = None
    ready: asyncio.Future | None = None


def _fields(**kw):
    return {"fields": kw}


class Service:
    """The devices of one configuration, served until stop()."""

    def __init__(self, config: cfg.Config, *, notifier: Notifier | None = None,
                 activation: dict[str, int] | None = None, reloadable: bool = True):
        self.config = config
        self.notifier = notifier if notifier is not None else Notifier.from_env()
        # socket activation: device name -> inherited listening fd (kept open for the life of
        # the process; each Server gets a dup, so a device removed and re-added by a reload
        # serves the same socket again)
        self.activation = dict(activation or {})
        self.reloadable = reloadable
        self.devices: dict[str, DeviceRuntime] = {}
        self.envs: dict[str, DeviceEnv] = {}       # device type -> what its devices share
        self.metrics = None
        self.stop_timeout = config.service.stop_timeout
        self.abandoned = 0               # queues whose worker outlived stop-timeout
        self._stopping: asyncio.Event | None = None
        self._reload_lock: asyncio.Lock | None = None
        self._watchdog: asyncio.Task | None = None
        self._reload_tasks: set = set()
        self.loop_name = "?"
        self.control = None             # ServiceControl: the control API's methods
        self.control_server = None      # ControlServer on control-socket
        self._broken_watch = None       # its task publishing queue-broken events

    # -- naming and status ---------------------------------------------------------------------

    def where(self, spec) -> str:
        """Error prefix naming the file and device ('' for a command-line device)."""
        if self.config.path is None:
            return ""
        return f"{self.config.path}: device \"{spec.name}\": "

    def status_text(self) -> str:
        n = len(self.devices)
        connected = sorted(name for name, rt in self.devices.items()
                           if rt.server.protocol is not None)
        text = f"serving {n} device{'s' if n != 1 else ''}; {len(connected)} frontend" \
               f"{'s' if len(connected) != 1 else ''} connected"
        if connected:
            text += " (" + ", ".join(connected) + ")"
        return text

    def samples(self):
        """Metrics: one DeviceSample per running device (called from the metrics thread)."""
        from .metrics import DeviceSample
        out = []
        for name, rt in list(self.devices.items()):
            try:
                queues = rt.device.queue_counters()
            except Exception:
                log.exception("reading the counters of %s failed", name)
                queues = {}
            out.append(DeviceSample(name=name, type=rt.spec.type,
                                    connected=rt.server.protocol is not None, queues=queues,
                                    socket=rt.spec.socket or f"fd {rt.spec.listen_fd}"))
        for type_name, env in list(self.envs.items()):
            # e.g. a switch's uplink tap: a port too (always "connected")
            for name, label, counters in env.ports():
                out.append(DeviceSample(name=name, type=type_name, connected=True,
                                        queues=counters(), socket=label))
        return out

    # -- building devices ----------------------------------------------------------------------

    def _env(self, dtype) -> DeviceEnv:
        env = self.envs.get(dtype.name)
        if env is None:
            env = self.envs[dtype.name] = dtype.environment(self.config.tables_of(dtype))
        return env

    def _prune_envs(self) -> None:
        """Let each type drop shared state no device uses any more (an emptied switch)."""
        for name, env in self.envs.items():
            env.reconfigure(self.config.tables_of(devices.get(name)))

    async def _build_off_loop(self, spec) -> DeviceRuntime:
        """_build in a thread: opening a device may wait on the network (an RBD image's
        cluster, up to its ceph-timeout), and the loop keeps serving the other devices."""
        return await asyncio.get_running_loop().run_in_executor(None, self._build, spec)

    def _build(self, spec) -> DeviceRuntime:
        """Open the backing store / tap / switch port of one device (no socket yet)."""
        dtype = devices.get(spec.type)
        dev = dtype.build(spec, self._env(dtype))
        dev.stop_timeout = self.stop_timeout
        listen_fd = spec.listen_fd
        socket_path = spec.socket
        if spec.name in self.activation:
            listen_fd = os.dup(self.activation[spec.name])
            bound = socket_path_of(self.activation[spec.name])
            if spec.socket and bound and os.path.realpath(bound) != os.path.realpath(spec.socket):
                log.warning("%s: the socket-activated socket is %s, not the configured %s; "
                            "serving the inherited one", spec.name, bound, spec.socket,
                            extra=_fields(device=spec.name))
        client = spec.mode == "client"
        if client and listen_fd is not None:
            if spec.name in self.activation:
                log.warning("%s: client mode connects to %s; the socket-activated socket is "
                            "not used", spec.name, spec.socket, extra=_fields(device=spec.name))
                os.close(listen_fd)
            listen_fd = None
        if listen_fd is not None:
            socket_path = None
        svc = self.config.service
        server = Server(dev, socket_path=socket_path, listen_fd=listen_fd, name=spec.name,
                        socket_mode=svc.socket_mode, socket_group=svc.socket_group,
                        on_connection=self._on_connection, on_queue=self._on_queue,
                        limits=_limits(svc), client=client)
        return DeviceRuntime(spec=spec, device=dev, server=server)

    def _close_device(self, rt: DeviceRuntime, log_stats: bool = True) -> None:
        dev = rt.device
        try:
            dev.reset()
        except Exception:
            log.exception("%s: reset failed", rt.spec.name)
        if log_stats:
            try:
                counters = dev.stats()
            except Exception:
                counters = None
            if counters is not None:
                logging.getLogger(devices.get(rt.spec.type).logger).info(
                    "stats", extra=_fields(device=rt.spec.name, **counters))
        try:
            dev.close()
        except Exception:                   # never abort the rest of a shutdown or reload
            log.exception("%s: close failed", rt.spec.name)
        self.abandoned += getattr(dev, "abandoned", 0)

    # -- running -------------------------------------------------------------------------------

    def _on_connection(self, server: Server, connected: bool) -> None:
        self.notifier.status(self.status_text())
        self._event("frontend-connected" if connected else "frontend-disconnected",
                    device=server.name, frontend=server.peer)

    def _on_queue(self, server: Server, index: int, state: str, avail: int) -> None:
        self._event(f"queue-{state}", device=server.name, queue=index, avail=avail)

    def _event(self, event: str, **fields) -> None:
        if self.control_server is not None:
            self.control_server.publish(event, **fields)

    async def _start(self, rt: DeviceRuntime) -> None:
        loop = asyncio.get_running_loop()
        rt.ready = loop.create_future()

        def on_ready(_server):
            if not rt.ready.done():
                rt.ready.set_result(True)

        rt.server._on_ready = on_ready
        rt.task = loop.create_task(rt.server.serve_forever(), name=f"serve {rt.spec.name}")
        await asyncio.wait([rt.ready, rt.task], return_when=asyncio.FIRST_COMPLETED)
        if not rt.ready.done():
            exc = rt.task.exception() if not rt.task.cancelled() else None
            raise StartError(f"{self.where(rt.spec)}{exc or 'server stopped'}")
        self.devices[rt.spec.name] = rt
        rt.task.add_done_callback(lambda t, name=rt.spec.name: self._server_ended(name, t))
        log.info("serving %s", _describe(rt.spec), extra=_fields(device=rt.spec.name))
        self._event("device-added", device=rt.spec.name, type=rt.spec.type)

    def _server_ended(self, name: str, task: asyncio.Task) -> None:
        if task.cancelled() or self._stopping is None or self._stopping.is_set():
            return
        exc = task.exception()
        if exc is not None and self.devices.get(name) is not None \
                and self.devices[name].task is task:
            log.error("%s stopped serving: %s", name, exc, extra=_fields(device=name))

    async def _stop(self, name: str, log_stats: bool = True) -> None:
        rt = self.devices.pop(name)
        rt.server.stop()
        if rt.task is not None:
            try:
                await rt.task
            except (asyncio.CancelledError, Exception):
                pass
        self._close_device(rt, log_stats)
        log.info("device %s stopped", name, extra=_fields(device=name))
        self._event("device-removed", device=name)

    async def start_all(self) -> None:
        """Build every device, then listen on every socket; any failure stops what started and
        raises StartError (one line)."""
        built: list[DeviceRuntime] = []
        try:
            for spec in self.config.devices:
                try:
                    built.append(await self._build_off_loop(spec))
                except (OSError, ValueError) as e:
                    raise StartError(f"{self.where(spec)}{e}") from None
            for rt in built:
                await self._start(rt)
        except BaseException:
            # start-up failed: undo quietly (the caller prints the one error line)
            for rt in built:
                if rt.spec.name in self.devices:
                    await self._stop(rt.spec.name, log_stats=False)
                else:
                    if rt.task is not None and not rt.task.done():
                        rt.task.cancel()
                    self._close_device(rt, log_stats=False)
            self._prune_envs()
            raise

    def _start_metrics(self, address: str | None) -> None:
        if address is None:
            return
        from .metrics import start_metrics_server
        try:
            self.metrics = start_metrics_server(address, self.samples)
        except (OSError, ValueError) as e:
            raise StartError(f"{self.config.path or 'metrics'}: metrics-address {address}: {e}") \
                from None
        log.info("metrics on http://%s/metrics", self.metrics.address,
                 extra=_fields(metrics=self.metrics.address))

    async def run(self) -> None:
        """Start everything, tell systemd READY=1, serve until stop(), then shut down."""
        self._stopping = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        self._start_metrics(self.config.service.metrics_address)
        try:
            await self.start_all()
        except BaseException:
            self._close_metrics()
            raise
        try:
            await self._start_control(self.config.service)
        except BaseException:
            for name in list(self.devices):
                await self._stop(name, log_stats=False)
            self._close_metrics()
            raise
        n = len(self.devices)
        log.info("ready: %d device%s", n, "s" if n != 1 else "",
                 extra=_fields(loop=self.loop_name, config=self.config.path or "-",
                               pid=os.getpid()))
        self.notifier.ready(self.status_text())
        try:
            interval = self.notifier.watchdog_interval()
        except ValueError as e:
            log.warning("ignoring the watchdog: %s", e)
            interval = None
        if interval:
            self._watchdog = asyncio.get_running_loop().create_task(self._watchdog_loop(interval))
        try:
            await self._stopping.wait()
        finally:
            await self.shutdown()

    async def _start_control(self, svc: cfg.ServiceSpec) -> None:
        if svc.control_socket is None:
            return
        from .control import ControlServer
        from .service_control import ServiceControl
        self.control = ServiceControl(self)
        self.control_server = ControlServer(svc.control_socket, self.control.methods(),
                                            group=svc.socket_group)
        try:
            await self.control_server.start()
        except OSError as e:
            self.control_server = None
            raise StartError(f"{self.config.path or 'control'}: {e}") from None
        self._broken_watch = asyncio.get_running_loop().create_task(
            self.control.watch_broken(self.control_server), name="control: broken rings")

    async def _watchdog_loop(self, interval: float) -> None:
        # Pinged from the event loop itself: a wedged control plane stops the pings and systemd
        # restarts the service (WatchdogSec=).
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(interval)

    def stop(self) -> None:
        if self._stopping is not None:
            self._stopping.set()

    async def shutdown(self) -> None:
        self.notifier.stopping("stopping")
        if self._watchdog is not None:
            self._watchdog.cancel()
        for t in list(self._reload_tasks):
            t.cancel()
        if self._broken_watch is not None:
            self._broken_watch.cancel()
        if self.control_server is not None:
            await self.control_server.close()
            self.control_server = None
        inflight = 0
        for rt in self.devices.values():
            try:
                inflight += sum(q.get("inflight", 0) for q in rt.device.queue_counters().values())
            except Exception:
                pass
        log.info("stopping %d device%s", len(self.devices), "s" if len(self.devices) != 1 else "",
                 extra=_fields(inflight=inflight))
        # stop accepting everywhere first, then wait for each device's teardown (in-flight I/O
        # completes inside the device's stop_queue, bounded by stop-timeout)
        for rt in self.devices.values():
            rt.server.stop()
        for name in list(self.devices):
            await self._stop(name)
        for env in self.envs.values():
            env.close()
        self.envs.clear()
        self._close_metrics()
        for fd in self.activation.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self.activation.clear()

    def _close_metrics(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None

    # -- SIGHUP --------------------------------------------------------------------------------

    def request_reload(self) -> None:
        loop = asyncio.get_running_loop()
        t = loop.create_task(self.reload())
        self._reload_tasks.add(t)
        t.add_done_callback(self._reload_tasks.discard)

    async def reload(self) -> bool:
        """Re-read the configuration file and apply the difference.  Returns False (and keeps
        running the old configuration) when the new file is invalid."""
        async with self._reload_lock:
            if self._stopping is not None and self._stopping.is_set():
                return False
            if not self.reloadable or self.config.path is None:
                log.warning("SIGHUP: no configuration file to reload")
                return False
            self.notifier.reloading()
            try:
                new = cfg.load(self.config.path)
            except cfg.ConfigError as e:
                log.error("reload failed, keeping the running configuration: %s", e)
                self.notifier.ready(self.status_text())
                return False
            if self.control is not None:
                new = self.control.merge_into(new)
            # the control socket is bound once (--control-socket may have set it): kept as is
            svc_new = new.service
            if (svc_new.control_socket, svc_new.control_persist) != \
                    (self.config.service.control_socket, self.config.service.control_persist):
                if svc_new.control_socket is not None or svc_new.control_persist:
                    log.warning("control-socket and control-persist are only read at start; "
                                "restart the service to change them")
                import dataclasses
                new = dataclasses.replace(new, service=dataclasses.replace(
                    svc_new, control_socket=self.config.service.control_socket,
                    control_persist=self.config.service.control_persist))
            old = self.config
            stop, start = [], []
            for name, rt in self.devices.items():
                spec = _find(new, name)
                dtype = devices.get(rt.spec.type)
                env = self.envs.get(rt.spec.type)
                if spec is None or spec != rt.spec or (env is not None and env.affected(
                        old.tables_of(dtype), new.tables_of(dtype), rt.spec)):
                    stop.append(name)
            for spec in new.devices:
                if spec.name not in self.devices or spec.name in stop:
                    start.append(spec)
            for name in stop:
                await self._stop(name)
            self.config = new
            self._prune_envs()          # rebuilds changed shared state (a changed switch)
            failed = []
            for spec in start:
                try:
                    rt = await self._build_off_loop(spec)
                except (OSError, ValueError) as e:
                    failed.append(spec.name)
                    log.error("%s%s", self.where(spec), e, extra=_fields(device=spec.name))
                    continue
                try:
                    await self._start(rt)
                except StartError as e:
                    failed.append(spec.name)
                    log.error("%s", e, extra=_fields(device=spec.name))
                    self._close_device(rt)
            self._apply_service(old.service, new.service)
            unchanged = len(self.devices) - len(start) + len(failed)
            log.info("reloaded %s: %d started, %d stopped, %d unchanged, %d failed",
                     new.path, len(start) - len(failed), len(stop), unchanged, len(failed),
                     extra=_fields(started=",".join(s.name for s in start
                                                    if s.name not in failed) or "-",
                                   stopped=",".join(stop) or "-",
                                   failed=",".join(failed) or "-"))
            self.notifier.ready(self.status_text())
            return not failed

    def _apply_service(self, old: cfg.ServiceSpec, new: cfg.ServiceSpec) -> None:
        if new.log_level != old.log_level:
            logging.getLogger().setLevel(new.log_level.upper())
        self.stop_timeout = new.stop_timeout
        if new.metrics_address != old.metrics_address:
            self._close_metrics()
            try:
                self._start_metrics(new.metrics_address)
            except StartError as e:
                log.error("%s", e)
        limits = _limits(new)
        for rt in self.devices.values():
            rt.server.limits = limits           # from the next connection on
        if (new.socket_mode, new.socket_group) != (old.socket_mode, old.socket_group):
            log.info("socket-mode/socket-group apply to sockets bound from now on")
        if new.loop != old.loop:
            log.warning("loop is only read at start; restart the service to change it")



def _limits(svc: cfg.ServiceSpec) -> Limits:
    return Limits(max_guest_memory=svc.max_guest_memory, max_message_fds=svc.max_message_fds)


def _find(config: cfg.Config, name: str):
    try:
        return config.device(name)
    except KeyError:
        return None


def _describe(spec) -> str:
    where = spec.socket if spec.listen_fd is None else f"fd {spec.listen_fd}"
    if spec.mode == "client":
        return f"{devices.get(spec.type).describe(spec)} connecting to {spec.socket}"
    return f"{devices.get(spec.type).describe(spec)} on {where}"


# -- running a Service as a program ---------------------------------------------------------------

def run_service(service: Service, loop_name: str | None = None, prog: str = "pyvhost") -> int:
    """Run `service` on the selected event loop with the signal handling systemd expects.
    Returns the exit status: 0 after SIGTERM/SIGINT, 1 when start-up failed (one line on stderr)
    or when a queue's in-flight I/O did not complete within stop-timeout."""
    name = loop_name or service.config.service.loop or default_loop_name()
    service.loop_name = name

    def on_stop(signum):
        log.info("received %s, stopping", signal.Signals(signum).name)
        service.stop()

    handlers = {signal.SIGTERM: on_stop, signal.SIGINT: on_stop,
                signal.SIGHUP: lambda _signum: service.request_reload()}
    with running_loop(name, handlers) as loop:
        try:
            loop.run_until_complete(service.run())
        except (StartError, ServerError) as e:
            sys.stderr.write(f"{prog}: error: {e}\n")
            return EXIT_FAIL
    if service.abandoned:
        log.error("%d queue%s did not finish in-flight I/O within %.0f s", service.abandoned,
                  "s" if service.abandoned != 1 else "", service.stop_timeout)
        return EXIT_FAIL
    return EXIT_OK


def activation_map() -> dict[str, int]:
    """Socket activation: LISTEN_FDNAMES -> {device name: fd}.  Unnamed fds ('unknown') and
    names no device uses are reported and closed by the caller's Service via the config."""
    out = {}
    for fd, name in listen_fds():
        if name in out:
            log.warning("socket activation: two sockets named %s; using the first", name)
            os.close(fd)
            continue
        out[name] = fd
    return out


def main(argv=None) -> int:
    from .cli import serve_parser
    p = serve_parser()
    args = p.parse_args(argv)
    if args.command is None:
        p.error("a command is required: serve, check or install-host")
    if args.command == "install-host":
        from .install import install_host
        return install_host(args.prefix, args.bindir, args.dry_run)
    try:
        config = cfg.load(args.config)
    except cfg.ConfigError as e:
        sys.stderr.write(f"pyvhost: error: {e}\n")
        return EXIT_FAIL
    if args.command == "check":
        print(f"{args.config}: {len(config.devices)} device"
              f"{'s' if len(config.devices) != 1 else ''} OK")
        return EXIT_OK
    svc = config.service
    overrides = {}
    if args.log_level:
        overrides["log_level"] = args.log_level
    if args.metrics_address:
        from .metrics import parse_address
        try:
            parse_address(args.metrics_address)
        except ValueError as e:
            p.error(str(e))
        overrides["metrics_address"] = args.metrics_address
    if getattr(args, "control_socket", None):
        if not os.path.isabs(args.control_socket):
            p.error("--control-socket must be an absolute path")
        overrides["control_socket"] = args.control_socket
    if overrides:
        import dataclasses
        config = dataclasses.replace(config, service=dataclasses.replace(svc, **overrides))
    logfmt.setup(config.service.log_level)
    activation = activation_map()
    names = {d.name for d in config.devices}
    for name in sorted(set(activation) - names):
        log.warning("socket activation: no device named %s in %s; closing that socket",
                    name, args.config)
        os.close(activation.pop(name))
    service = Service(config, activation=activation)
    return run_service(service, args.loop, prog="pyvhost")


def run_single(config: cfg.Config, prog: str, loop_name: str | None) -> int:
    """pyvhost-blk / pyvhost-net: a one-configuration service built from the command line."""
    return run_service(Service(config, reloadable=False), loop_name, prog=prog)


if __name__ == "__main__":
    sys.exit(main())
