"""A real Valkey/Redis Cluster on loopback ports, for the tests and the benchmarks.

Three primaries (no replicas), each a valkey-server/redis-server process with cluster mode on, the
16384 slots split in three ranges, joined with CLUSTER MEET. A node's cluster bus listens on its port
+ 10000, so every port is picked below 55536 with both it and its bus port free.

    with valkey_cluster(directory) as cluster:
        cluster.url            # redis://127.0.0.1:<first node's port>/0: any node names the cluster
        cluster.move_slot(...) # reshard one slot live (MIGRATING/IMPORTING, MIGRATE, SETSLOT NODE)
"""

from __future__ import annotations

import contextlib
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import valkey

SERVER = shutil.which("valkey-server") or shutil.which("redis-server") or "redis-server"
SLOTS = 16384


def free_cluster_port(taken: set[int]) -> int:
    """A port below 55536 whose bus port (+10000) is free too."""
    for _ in range(1000):
        port = random.randrange(20000, 45000)
        if port in taken or port + 10000 in taken:
            continue
        try:
            for p in (port, port + 10000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        taken.update((port, port + 10000))
        return port
    raise RuntimeError("no free port pair below 55536")


class Cluster:
    """Three cluster nodes on loopback; `announce` maps a node's port to the port it tells clients (a proxy)."""

    def __init__(
        self, directory: Path, nodes: int = 3, announce: dict[int, int] | None = None, replicas: bool = False
    ) -> None:
        taken: set[int] = set()
        self.dir = directory
        self.ports = [free_cluster_port(taken) for _ in range(nodes)]  # the primaries
        self.replicas = [free_cluster_port(taken) for _ in range(nodes)] if replicas else []  # one per primary
        self.announce = announce or {}
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def client(self, port: int) -> valkey.Valkey:
        return valkey.Valkey(host="127.0.0.1", port=port, socket_timeout=5)

    def start_node(self, port: int) -> None:
        args = [
            SERVER,
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            str(self.dir / f"nodes-{port}.conf"),
            "--cluster-node-timeout",
            "2000",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.dir),
            "--logfile",
            str(self.dir / f"node-{port}.log"),
        ]
        if port in self.announce:
            args += [
                "--cluster-announce-port",
                str(self.announce[port]),
                "--cluster-announce-bus-port",
                str(port + 10000),
            ]
        self.procs[port] = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                return
            time.sleep(0.02)
        raise RuntimeError(f"{SERVER} did not start: {(self.dir / f'node-{port}.log').read_text()}")

    def start(self) -> None:
        for port in self.ports + self.replicas:
            self.start_node(port)
        share = SLOTS // len(self.ports)
        for i, port in enumerate(self.ports):
            last = SLOTS - 1 if i == len(self.ports) - 1 else (i + 1) * share - 1
            with self.client(port) as c:
                c.execute_command("CLUSTER", "ADDSLOTSRANGE", i * share, last)
        with self.client(self.ports[0]) as c:
            for port in self.ports[1:] + self.replicas:
                c.execute_command("CLUSTER", "MEET", "127.0.0.1", port)
        for primary, replica in zip(self.ports, self.replicas, strict=False):
            self.replicate(replica, self.node_id(primary))
        self.wait_ok()
        for primary in self.ports if self.replicas else []:  # each replica synced and following
            deadline = time.monotonic() + 20
            with self.client(primary) as c:
                while c.info("replication").get("slave0", {}).get("state") != "online":
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"the replica of {primary} did not sync")
                    time.sleep(0.05)

    def replicate(self, replica: int, primary_id: str, timeout: float = 10) -> None:
        """Make `replica` a replica of the primary (once the MEETs have told it about that node)."""
        deadline = time.monotonic() + timeout
        with self.client(replica) as c:
            while True:
                try:
                    c.execute_command("CLUSTER", "REPLICATE", primary_id)
                    return
                except valkey.ResponseError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)

    def live(self) -> list[int]:
        return [port for port, proc in self.procs.items() if proc.poll() is None]

    def wait_ok(self, timeout: float = 20) -> None:
        """Until every live node says the cluster is ok and agrees on who holds every slot."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            views = []
            for port in self.live():
                with self.client(port) as c:
                    info = c.execute_command("CLUSTER", "INFO").decode()
                    views.append(("cluster_state:ok" in info, self.owners(c)))
            if all(ok for ok, _ in views) and all(owners == views[0][1] for _, owners in views):
                return
            time.sleep(0.05)
        raise RuntimeError("the cluster did not come up")

    @staticmethod
    def owners(c: valkey.Valkey) -> list[tuple[int, int, int]]:
        return sorted((int(a), int(b), int(node[1])) for a, b, node, *_ in c.execute_command("CLUSTER", "SLOTS"))

    def node_id(self, port: int) -> str:
        with self.client(port) as c:
            return str(c.execute_command("CLUSTER", "MYID").decode())

    def owner(self, key: str) -> int:
        """The port of the node that holds the key's slot."""
        with self.client(self.live()[0]) as c:
            slot = int(c.execute_command("CLUSTER", "KEYSLOT", key))
            for first, last, port in self.owners(c):
                if first <= slot <= last:
                    return port
        raise LookupError(slot)

    def begin_moving_slot(self, key: str, to: int) -> tuple[int, int]:
        """Mark the key's slot MIGRATING on its owner and IMPORTING on `to` (ASK redirects start here)."""
        source = self.owner(key)
        with self.client(source) as c:
            slot = int(c.execute_command("CLUSTER", "KEYSLOT", key))
        with self.client(to) as c:
            c.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", self.node_id(source))
        with self.client(source) as c:
            c.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", self.node_id(to))
        return slot, source

    def migrate_keys(self, slot: int, source: int, to: int, keys: list[str] | None = None) -> None:
        """MIGRATE the slot's keys (or the given ones) from source to `to`."""
        with self.client(source) as c:
            names = (
                keys
                if keys is not None
                else [k.decode() for k in c.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 1000)]
            )
            if names:
                c.execute_command("MIGRATE", "127.0.0.1", to, "", 0, 5000, "KEYS", *names)

    def finish_moving_slot(self, slot: int, to: int) -> None:
        """Give the slot to `to` on every node (after this, the old owner answers MOVED)."""
        owner = self.node_id(to)
        for port in [to, *[p for p in self.ports if p != to]]:
            with self.client(port) as c:
                c.execute_command("CLUSTER", "SETSLOT", slot, "NODE", owner)

    def move_slot(self, key: str, to: int) -> None:
        """Reshard the key's slot to `to`, keys and all."""
        slot, source = self.begin_moving_slot(key, to)
        self.migrate_keys(slot, source, to)
        self.finish_moving_slot(slot, to)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)


@contextlib.contextmanager
def valkey_cluster(directory: Path, **kwargs: object) -> Iterator[Cluster]:
    cluster = Cluster(directory, **kwargs)  # type: ignore[arg-type]
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
