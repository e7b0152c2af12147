"""Real `ringinfer daemon` processes, on loopback or in network namespaces (tests/lan.py)."""

from __future__ import annotations

import functools
import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import torch

from discovery.capabilities import CACHE_FILE, cache_key, model_key_of
from node.cluster.secret import ENV
from node.engine.weights import default_model_path, layer_format, open_checkpoint
from tests.conftest import run_cli
from tests.ports import free_port

# What loopback clusters' daemons find in their data dir instead of measuring: one machine
# runs them all, so equal capabilities make their plans repeatable.
SAME_CAPABILITIES = {"flops": 1e11, "bandwidth": 1e10, "layer_overhead_s": 5e-5}


# Loopback clusters that compute what --local does. throughput: on one machine's equal
# daemons, latency would rightly keep the model on one node. float32 activations on the wire:
# the ring then computes bit for bit what --local does (float16 flips near-ties of greedy
# decoding; test_ring's perplexity test bounds that path).
EXACT_RING = ["--objective", "throughput", "--wire-dtype", "float32"]
LAN_SECRET = "0" * 16 + "a test cluster's secret, not a secret"


@functools.cache
def _default_model_key() -> str:
    ckpt = open_checkpoint(None)
    fmt = layer_format(ckpt, "auto", torch.device("cpu"))  # what a daemon holds by default
    return model_key_of((ckpt.name, ckpt.family, ckpt.config, fmt))


def seed_capabilities(data_dir: Path) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    key = cache_key(torch.device("cpu"), torch.float32)
    layers = {_default_model_key(): 1e-3}  # other models are timed by the daemon itself
    cache = {"key": key, **SAME_CAPABILITIES, "layer_s": layers}
    (data_dir / CACHE_FILE).write_text(json.dumps(cache))


def renamed_model(path: Path) -> Path:
    """The default model's file with one letter of general.name changed: same weights,
    another fingerprint."""
    data = bytearray(default_model_path().read_bytes())
    key = b"general.name"
    at = data.find(key) + len(key)
    kind, _ = struct.unpack_from("<IQ", data, at)
    assert kind == 8  # a string
    data[at + 12] ^= 0x20  # its first letter's case
    path.write_bytes(data)
    return path


class Daemon:
    """One daemon; in namespace `netns` at `host` when given (listening on every address),
    with `env` added to its environment."""

    def __init__(
        self, root: Path, name: str, port: int, args: list[str], netns: str | None = None,
        host: str = "127.0.0.1", env: dict[str, str] | None = None,
    ) -> None:  # fmt: skip
        self.name, self.port, self.netns = name, port, netns
        self.address = f"{host}:{port}"
        self.log = root / f"{name}.log"
        self.data_dir = root / name
        prefix = ["ip", "netns", "exec", netns] if netns else []
        listen = "0.0.0.0" if netns else host
        self.env: dict[str, str] = {}
        if netns and "--secret-file" not in args and "--insecure" not in args:
            secret = root / "cluster.key"  # a LAN of namespaces: one secret for the cluster
            if not secret.exists():
                secret.write_text(LAN_SECRET)
            args = [*args, "--secret-file", str(secret)]
        if "--secret-file" in args:  # its clients hold the secret too
            self.env[ENV] = args[args.index("--secret-file") + 1]
        if "--api" not in args:  # one machine, many daemons: each its own API port
            args = [*args, "--api", f"127.0.0.1:{free_port()}"]
        api = args[args.index("--api") + 1]
        self.api = None if api == "off" else f"http://{api}"  # from where the daemon runs
        cmd = [
            *prefix, sys.executable, "-m", "node.cli", "daemon", "--host", listen,
            "--port", str(port), "--name", name, "--data-dir", str(self.data_dir), *args,
        ]  # fmt: skip
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "RINGINFER_DEBUG": "1", **self.env,
               **(env or {})}
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)

    def cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        """`ringinfer ARGS` from where this daemon runs (its namespace)."""
        return run_cli(*args, timeout=timeout, netns=self.netns, env=self.env)

    def status(self, wait: float = 0) -> dict:
        """Its status; `wait`: seconds it may take to start answering (loading, say)."""
        waiting = ["--wait", str(wait)] if wait else []
        proc = self.cli("status", "--node", self.address, "--json", *waiting, timeout=30 + wait)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=30)

    def text(self) -> str:
        return self.log.read_text()


class Cluster:
    """Daemons on one model, waited on until live: by default `n` on loopback, each knowing
    the first by `--peer`, with equal capabilities (node i with `env[i]` in its environment);
    or those given, already started."""

    def __init__(
        self, root: Path, n: int, args: list[str], per_node: dict[int, list[str]] | None = None,
        nodes: list[Daemon] | None = None, env: dict[int, dict[str, str]] | None = None,
    ) -> None:  # fmt: skip
        if nodes is None:
            ports = [free_port() for _ in range(n)]
            peer = ["--no-mdns", "--peer", f"127.0.0.1:{ports[0]}"]
            extra = per_node or {}
            for i in range(n):
                seed_capabilities(root / f"node{i + 1}")
            nodes = [
                Daemon(root, f"node{i + 1}", port, [*args, *peer, *extra.get(i, [])],
                       env=(env or {}).get(i))  # fmt: skip
                for i, port in enumerate(ports)
            ]
        self.nodes = nodes
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
                proc = d.cli("status", "--node", d.address, "--json", "--wait", "60")
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
