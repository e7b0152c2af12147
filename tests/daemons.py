"""Real `ringinfer daemon` processes on loopback, started and stopped by the tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import run_cli


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Daemon:
    def __init__(self, root: Path, name: str, port: int, args: list[str]) -> None:
        self.name, self.port = name, port
        self.address = f"127.0.0.1:{port}"
        self.log = root / f"{name}.log"
        cmd = [
            sys.executable, "-m", "node.cli", "daemon", "--host", "127.0.0.1",
            "--port", str(port), "--name", name, "--data-dir", str(root / name), *args,
        ]  # fmt: skip
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "RINGINFER_DEBUG": "1"}
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)

    def status(self) -> dict:
        proc = run_cli("status", "--node", self.address, "--json", timeout=30)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=30)

    def text(self) -> str:
        return self.log.read_text()


class Cluster:
    """`n` daemons on one model, each knowing the first by `--peer`, waited on until live."""

    def __init__(
        self, root: Path, n: int, args: list[str], per_node: dict[int, list[str]] | None = None
    ) -> None:
        ports = [free_port() for _ in range(n)]
        peer = ["--peer", f"127.0.0.1:{ports[0]}"]
        extra = per_node or {}
        self.nodes = [
            Daemon(root, f"node{i + 1}", port, [*args, *peer, *extra.get(i, [])])
            for i, port in enumerate(ports)
        ]
        try:
            self.wait_live(n)
        except BaseException:
            self.stop()
            raise

    def wait_live(self, members: int, timeout: float = 120) -> dict:
        """Every node's status once all agree on one live plan with `members` members."""
        deadline = time.monotonic() + timeout
        while True:
            alive = [d for d in self.nodes if d.proc.poll() is None]
            if not alive:
                raise AssertionError(
                    "every daemon exited:\n" + "\n".join(d.text() for d in self.nodes)
                )
            statuses = []
            for d in alive:
                proc = run_cli("status", "--node", d.address, "--json", "--wait", "60")
                if proc.returncode == 0:
                    statuses.append(json.loads(proc.stdout))
            epochs = {s["epoch"] for s in statuses}
            if (
                len(statuses) == len(alive)
                and len(epochs) == 1
                and all(s["live"] and len(s["nodes"]) == members for s in statuses)
            ):
                return statuses[0]
            if time.monotonic() > deadline:
                logs = "\n".join(d.text()[-2000:] for d in self.nodes)
                raise AssertionError(f"no common live plan: {statuses}\n{logs}")
            time.sleep(0.5)

    def stop(self) -> None:
        for d in self.nodes:
            if d.proc.poll() is None:
                d.proc.send_signal(signal.SIGTERM)
        for d in self.nodes:
            try:
                d.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                d.proc.kill()
