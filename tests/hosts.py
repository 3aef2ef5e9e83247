"""Several hosts on one machine, for the fault tests: a network namespace per host, each with
its own address on a bridge that this machine's own namespace joins too (it is the test's host:
the Tinker test server listens there). Needs root and iproute2; traffic never leaves the
machine.

    with Network(["server", "w1", "w2"]) as net:
        net.address("server")          # "10.201.7.2"
        processes.start([...], netns=net.namespace("w1"))
        net.cut("w1"); ...; net.restore("w1")    # its link down, as a pulled cable
"""

import os
import random
import re
import shutil
import subprocess


def available() -> str | None:
    """Why hosts cannot be made here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if not shutil.which("ip"):
        return "iproute2's `ip` is missing (apt-get install iproute2)"
    return None


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


class Network:
    def __init__(self, hosts: list[str]):
        self.hosts = list(hosts)
        self.tag = f"lpt{os.getpid()}"  # interface names: at most 15 characters
        self.prefix = f"10.{random.randrange(200, 250)}.{random.randrange(1, 250)}"
        self.bridge = f"{self.tag}br"

    @property
    def gateway(self) -> str:
        """This machine's own address on the bridge."""
        return f"{self.prefix}.1"

    def address(self, host: str) -> str:
        return f"{self.prefix}.{self.hosts.index(host) + 2}"

    def namespace(self, host: str) -> str:
        return f"{self.tag}-{host}"

    def _outer(self, host: str) -> str:
        return f"{self.tag}p{self.hosts.index(host)}"

    def __enter__(self) -> "Network":
        self._remove_stale()
        try:
            ip("link", "add", self.bridge, "type", "bridge")
            ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
            ip("link", "set", self.bridge, "up")
            for n, host in enumerate(self.hosts):
                ns, inner, outer = self.namespace(host), f"{self.tag}h{n}", self._outer(host)
                ip("netns", "add", ns)
                ip("link", "add", inner, "type", "veth", "peer", "name", outer)
                ip("link", "set", inner, "netns", ns)
                ip("link", "set", outer, "master", self.bridge, "up")
                ip("-n", ns, "addr", "add", f"{self.address(host)}/24", "dev", inner)
                ip("-n", ns, "link", "set", inner, "up")
                ip("-n", ns, "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for host in self.hosts:
            ip("netns", "del", self.namespace(host), check=False)
        ip("link", "del", self.bridge, check=False)

    def cut(self, host: str) -> None:
        """The host's link goes down: its packets go nowhere, as when its cable is pulled."""
        ip("link", "set", self._outer(host), "down")

    def restore(self, host: str) -> None:
        ip("link", "set", self._outer(host), "up")

    def unreachable(self, host: str, address: str, on: bool = True) -> None:
        """From `host`, `address` answers nothing (an `unreachable` route), or again."""
        ip("-n", self.namespace(host), "route", "add" if on else "del", "unreachable", f"{address}/32")

    @staticmethod
    def _remove_stale() -> None:
        """Namespaces and bridges of test sessions whose process is gone (killed with -9)."""
        names = ip("netns", "list").stdout.split() + re.findall(r"\d+: (lpt\d+br)", ip("link").stdout)
        for name in names:
            m = re.match(r"lpt(\d+)", name)
            if m and not os.path.exists(f"/proc/{m.group(1)}"):
                if name.endswith("br"):
                    ip("link", "del", name, check=False)
                else:
                    ip("netns", "del", name, check=False)
