"""Several "hosts" on one machine for the multi-host tests: each host is a network namespace
with its own loopback and one address on a bridge this module creates (iproute2's `ip netns`,
veth pairs). Processes started on a host see only its network: they reach the other hosts by
their bridge addresses and nothing else (the bridge has no route out, and only addresses
made here are ever contacted). Killing a host kills every process in its namespace, as
pulling its plug would. (No tests here.)"""
from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field


def available() -> str | None:
    """Why namespaces cannot be made here, or None."""
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = f"tlprobe{os.getpid()}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if r.returncode != 0:
        return f"`ip netns add` failed: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ip(*args: str, ns: str | None = None) -> None:
    cmd = ["ip", *(["-n", ns] if ns else []), *args]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip()}")


@dataclass
class Host:
    name: str
    ns: str
    address: str
    procs: list[subprocess.Popen] = field(default_factory=list)

    def popen(self, args: list[str], **kw) -> subprocess.Popen:
        """A process on this host (in its namespace, in a process group of its own)."""
        proc = subprocess.Popen(["ip", "netns", "exec", self.ns, *args],
                                start_new_session=True, **kw)
        self.procs.append(proc)
        return proc

    def pids(self) -> list[int]:
        r = subprocess.run(["ip", "netns", "pids", self.ns], capture_output=True, text=True)
        return [int(p) for p in r.stdout.split()]

    def kill(self) -> None:
        """Every process on the host, at once (SIGKILL): the host is gone."""
        for _ in range(5):
            pids = self.pids()
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass


class Network:
    """A bridge with hosts on it: `with Network(["db", "api", "h1"]) as net: net["db"]`."""

    def __init__(self, names: list[str]):
        self.tag = f"{os.getpid() % 10000}{random.randrange(100)}"
        self.subnet = f"10.231.{random.randrange(1, 250)}"
        self.bridge = f"tlbr{self.tag}"[:15]
        self.names = names
        self.hosts: dict[str, Host] = {}

    def __enter__(self) -> Network:
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("addr", "add", f"{self.subnet}.1/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
            for i, name in enumerate(self.names, start=10):
                ns = f"tl{self.tag}-{name}"
                outer, inner = f"tlv{self.tag}{i}"[:15], f"tlp{self.tag}{i}"[:15]
                _ip("netns", "add", ns)
                _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
                _ip("link", "set", inner, "netns", ns)
                _ip("link", "set", outer, "master", self.bridge)
                _ip("link", "set", outer, "up")
                _ip("addr", "add", f"{self.subnet}.{i}/24", "dev", inner, ns=ns)
                _ip("link", "set", inner, "up", ns=ns)
                _ip("link", "set", "lo", "up", ns=ns)
                self.hosts[name] = Host(name, ns, f"{self.subnet}.{i}")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    @property
    def gateway(self) -> str:
        """This machine's own address on the bridge (where the tests' clients sit)."""
        return f"{self.subnet}.1"

    def __exit__(self, *exc) -> None:
        for host in self.hosts.values():
            host.kill()
            subprocess.run(["ip", "netns", "del", host.ns], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
