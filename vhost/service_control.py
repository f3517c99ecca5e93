"""service_control.py: the control API's methods over a running Service (vhost/service.py), served
by vhost/control.py on `control-socket`.

Methods: `device-list`, `device-show {name}`, `device-add {the keys of a [[device]] table}`,
`device-del {name, force}`, `switch-show {name?}`, `set-log-level {level}`, and `subscribe` (control.py).
Events: device-added, device-removed, frontend-connected, frontend-disconnected (the service),
queue-started / queue-stopped {device, queue, avail} (the connection's protocol, through the
server), queue-broken {device, queue} (`watch_broken`: the workers latch a corrupt ring in a
counter without telling anyone, so the counters are read every BROKEN_POLL seconds while
someone is subscribed).

Owns what a runtime change means for the configuration: a device added here is validated by the
same code as the file (config.parse for its table, config.finish across the running devices:
sockets, names, each type's cross-device checks), started like a device of a reload, kept across
SIGHUP (merged into the re-read file; a file device of the same name wins, loudly), and with
`control-persist` written to pyvhost.d/NAME.toml beside the config so a restart serves it too;
`device-del` removes it (and its drop-in).  A file device deleted here comes back at the next
reload: the file is the administrator's.
Must not: parse the socket's JSON (control.py) or reach into devices beyond the DeviceType hooks
and the counters the metrics use.
"""
from __future__ import annotations

import asyncio
import logging
import os

import devices

from . import config as cfg
from .control import INVALID_PARAMS, RpcError
from .devtype import Names

log = logging.getLogger("pyvhost.service")

LEVELS = ("debug", "info", "warning", "error")
BROKEN_POLL = 0.5           # s: how late a queue-broken event may be; a read of the counters


def _jsonable(v):
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    return str(v)


class ServiceControl:
    def __init__(self, service):
        self.svc = service
        # devices added over the API: name -> their [[device]] table (what a drop-in holds);
        # after a restart, the persisted ones (read back from their drop-ins)
        self.added: dict[str, dict] = {}
        d = self._dropin("")
        if d is not None and os.path.isdir(os.path.dirname(d)):
            import tomllib
            for fn in sorted(os.listdir(os.path.dirname(d))):
                try:
                    with open(os.path.join(os.path.dirname(d), fn), "rb") as f:
                        tables = tomllib.load(f).get("device", [])
                except (OSError, ValueError):
                    continue
                for t in tables:
                    if isinstance(t, dict) and fn == f"{t.get('name')}.toml":
                        self.added[t["name"]] = t

    def methods(self) -> dict:
        return {"device-list": self.device_list, "device-show": self.device_show,
                "device-add": self.device_add, "device-del": self.device_del,
                "switch-show": self.switch_show, "set-log-level": self.set_log_level}

    # -- reading ---------------------------------------------------------------------------

    def _summary(self, name: str, rt) -> dict:
        spec = rt.spec
        return dict(name=name, type=spec.type,
                    socket=spec.socket or f"fd {spec.listen_fd}", mode=spec.mode,
                    connected=rt.server.protocol is not None, frontend=rt.server.peer,
                    origin="control" if name in self.added else "config")

    def _rt(self, params: dict):
        name = params.get("name")
        if not isinstance(name, str):
            raise RpcError('"name" (a string) is required', INVALID_PARAMS)
        rt = self.svc.devices.get(name)
        if rt is None:
            raise RpcError(f"no device {name!r}", data=sorted(self.svc.devices))
        return name, rt

    def device_list(self, params, caller):
        return [self._summary(n, rt) for n, rt in sorted(self.svc.devices.items())]

    def device_show(self, params, caller):
        name, rt = self._rt(params)
        out = self._summary(name, rt)
        out["options"] = _jsonable(cfg.spec_fields(rt.spec))
        out["description"] = devices.get(rt.spec.type).describe(rt.spec)
        dev = rt.device
        proto = rt.server.protocol          # its control thread writes these: plain ints
        if proto is not None:
            out["features"] = f"{proto.features:#x}"            # negotiated (SET_FEATURES)
            out["protocol_features"] = f"{int(proto.protocol_features):#x}"
        try:
            queues = dev.queue_counters()
        except Exception as e:          # counters are best effort, the answer is not
            out["queues"] = {"error": str(e)}
            return out
        running = proto.queues_running() if proto is not None else ()
        for i, c in queues.items():
            c["state"] = "broken" if c.get("broken") else \
                "running" if i in running else "stopped"
        out["queues"] = _jsonable(queues)
        return out

    async def watch_broken(self, server) -> None:
        """Publish queue-broken when a queue's `broken` gauge goes to 1 (once per breakage)."""
        seen: set[tuple[str, int]] = set()
        while True:
            await asyncio.sleep(BROKEN_POLL)
            if not server.subscribed:
                continue
            now = set()
            for name, rt in list(self.svc.devices.items()):
                try:
                    counters = rt.device.queue_counters()
                except Exception:       # noqa: BLE001 - a device being torn down
                    continue
                now.update((name, i) for i, c in counters.items() if c.get("broken"))
            for name, i in sorted(now - seen):
                server.publish("queue-broken", device=name, queue=i)
            seen = now

    def switch_show(self, params, caller):
        """Every switch (or `name`'s): ports, uplink, counters, MAC table."""
        env = self.svc.envs.get("net")
        switches = _jsonable(env.describe()) if env is not None else {}
        name = params.get("name")
        if name is None:
            return switches
        if name not in switches:
            raise RpcError(f"no running switch {name!r}", data=sorted(switches))
        return {name: switches[name]}

    def set_log_level(self, params, caller):
        level = params.get("level")
        if level not in LEVELS:
            raise RpcError(f"level must be one of {', '.join(LEVELS)}", INVALID_PARAMS)
        logging.getLogger().setLevel(level.upper())
        log.info("log level %s (control API, uid %d)", level, caller.uid)
        return {"level": level}

    # -- changing ----------------------------------------------------------------------------

    def _validated(self, table: dict, base: cfg.Config) -> cfg.Config:
        """base plus the device of `table`, validated as the file would be."""
        try:
            one = cfg.parse({"device": [table]}, "device-add")
        except cfg.ConfigError as e:
            raise RpcError(str(e), INVALID_PARAMS) from None
        spec = one.devices[0]
        if any(d.name == spec.name for d in base.devices):
            raise RpcError(f"device {spec.name!r} exists")
        mine = os.path.realpath(spec.socket) if spec.socket else None
        for d in base.devices:
            if mine and d.socket and os.path.realpath(d.socket) == mine:
                raise RpcError(f"socket {spec.socket} is already used by device \"{d.name}\"")
        tables = {t: dict(entries) for t, entries in base.tables.items()}
        for t, entries in one.tables.items():      # implicit entries (a new switch)
            for k, v in entries.items():
                tables.setdefault(t, {}).setdefault(k, v)
        try:
            return cfg.finish(base.path, base.service, list(base.devices) + [spec], tables,
                              Names(cli=False))
        except cfg.ConfigError as e:
            raise RpcError(str(e).removeprefix(f"{base.path}: "), INVALID_PARAMS) from None

    async def device_add(self, params, caller):
        table = dict(params)
        svc = self.svc
        async with svc._reload_lock:
            old = svc.config
            new = self._validated(table, old)
            spec = new.devices[-1]
            svc.config = new
            svc._prune_envs()
            try:
                rt = await svc._build_off_loop(spec)
            except (OSError, ValueError) as e:
                svc.config = old
                svc._prune_envs()
                raise RpcError(str(e)) from None
            try:
                await svc._start(rt)
            except Exception as e:
                svc._close_device(rt, log_stats=False)
                svc.config = old
                svc._prune_envs()
                raise RpcError(str(e)) from None
            self.added[spec.name] = table
            path = self._persist(spec.name, table)
            log.info("device %s added (control API, uid %d)%s", spec.name, caller.uid,
                     f", persisted in {path}" if path else "")
            svc.notifier.status(svc.status_text())
            return dict(self._summary(spec.name, rt), persisted=path)

    async def device_del(self, params, caller):
        svc = self.svc
        async with svc._reload_lock:
            name, rt = self._rt(params)
            if rt.server.protocol is not None and not params.get("force"):
                raise RpcError(f"{name}: a frontend is connected ({rt.server.peer}); "
                               f"\"force\": true stops its queues as SIGTERM would")
            await svc._stop(name)
            svc.config = cfg.Config(path=svc.config.path, service=svc.config.service,
                                    devices=tuple(d for d in svc.config.devices
                                                  if d.name != name),
                                    tables=svc.config.tables)
            svc._prune_envs()
            removed = None
            if self.added.pop(name, None) is not None:
                removed = self._unpersist(name)
            log.info("device %s removed (control API, uid %d)", name, caller.uid)
            svc.notifier.status(svc.status_text())
            return {"removed": name, "dropin_removed": removed}

    # -- SIGHUP and restarts -------------------------------------------------------------------

    def merge_into(self, new: cfg.Config) -> cfg.Config:
        """The re-read file plus the devices added here that it does not have (a persisted one
        is in it already, through its drop-in)."""
        for name, table in list(self.added.items()):
            if any(d.name == name for d in new.devices):
                continue
            try:
                new = self._validated(table, new)
            except RpcError as e:
                log.error("device %s added over the control API conflicts with the reloaded "
                          "configuration and is stopped: %s", name, e.message)
                del self.added[name]
                self._unpersist(name)
        return new

    def _dropin(self, name: str) -> str | None:
        svc = self.svc
        if not svc.config.service.control_persist or svc.config.path is None:
            return None
        return os.path.join(cfg.dropin_dir(svc.config.path), f"{name}.toml")

    def _persist(self, name: str, table: dict) -> str | None:
        path = self._dropin(name)
        if path is None:
            return None
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = path + ".new"
            with open(tmp, "w") as f:
                f.write("# added with `pyvhostctl device-add` (control-persist): read at every "
                        "start and reload\n" + cfg.device_toml(table))
            os.replace(tmp, path)
        except (OSError, ValueError) as e:
            log.error("device %s: not persisted (%s): it will not survive a restart", name, e)
            return None
        return path

    def _unpersist(self, name: str) -> str | None:
        path = self._dropin(name)
        if path is None or not os.path.exists(path):
            return None
        try:
            os.unlink(path)
        except OSError as e:
            log.error("device %s: cannot remove %s: %s", name, path, e)
            return None
        return path
