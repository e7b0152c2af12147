"""The cluster secret: CurveZMQ on every connection, strangers get nothing, secure defaults."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from pathlib import Path

import pytest
import zmq

from node.cluster.secret import ClusterKeys, new_secret
from protocol.wire import Kind, encode, message
from tests.conftest import run_cli
from tests.daemons import Cluster, Daemon, free_port, seed_capabilities

PROMPT = "The capital of France is"


def one_line_error(proc, words: str) -> None:  # noqa: ANN001
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and words in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_secret_makes_new_secrets_and_files_only_its_owner_reads(tmp_path: Path):
    a, b = (run_cli("secret").stdout.strip() for _ in range(2))
    assert re.fullmatch("[0-9a-f]{64}", a) and a != b
    assert run_cli("secret", str(tmp_path / "k")).returncode == 0
    assert (tmp_path / "k").stat().st_mode & 0o777 == 0o600
    one_line_error(run_cli("secret", str(tmp_path / "k")), "cannot create")


def test_without_a_secret_a_daemon_listens_on_loopback_only(tmp_path: Path):
    one_line_error(run_cli("daemon", "--host", "0.0.0.0", "--port", str(free_port()),
                           "--data-dir", str(tmp_path / "d"), "--api", "off"),
                   "no cluster secret")  # fmt: skip
    (tmp_path / "short").write_text("short")
    one_line_error(run_cli("daemon", "--secret-file", str(tmp_path / "short"), "--data-dir",
                           str(tmp_path / "e"), "--api", "off"), "needs 128")  # fmt: skip


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    root = tmp_path_factory.mktemp("secret")
    assert run_cli("secret", str(root / "cluster.key")).returncode == 0
    args = ["--objective", "throughput", "--secret-file", str(root / "cluster.key")]
    c = Cluster(root, 2, args)
    yield c
    c.stop()


def test_holders_of_the_secret_generate_like_local(cluster):  # noqa: ANN001
    local = run_cli("generate", "--local", "--json", "--max-tokens", "8", PROMPT)
    ring = cluster.nodes[1].cli("generate", "--node", cluster.nodes[1].address, "--json",
                                "--max-tokens", "8", PROMPT)  # fmt: skip
    assert ring.returncode == 0, ring.stderr
    assert json.loads(ring.stdout)["tokens"] == json.loads(local.stdout)["tokens"]
    assert cluster.nodes[0].status()["secret"] == ClusterKeys.of(
        Path(cluster.nodes[0].env["RINGINFER_SECRET_FILE"]).read_text().strip()
    ).fingerprint


def test_a_client_without_the_secret_gets_one_line(cluster):  # noqa: ANN001
    proc = run_cli("status", "--node", cluster.nodes[0].address)
    one_line_error(proc, "pass --secret-file")


def listener() -> tuple[socket.socket, list[object]]:
    """A TCP port that records whoever connects to it."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    sock.settimeout(0.2)
    seen: list[object] = []

    def accept() -> None:
        while True:
            try:
                seen.append(sock.accept())
            except TimeoutError:
                continue
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    return sock, seen


def test_strangers_get_no_reply_are_never_dialled_and_never_members(cluster):  # noqa: ANN001
    bait, dialled = listener()
    bait_address = f"127.0.0.1:{bait.getsockname()[1]}"
    hello = message(Kind.HELLO, body={
        "id": "0000stranger", "name": "stranger", "port": bait.getsockname()[1],
        "model": "m", "fingerprint": "f", "memory": 1 << 40, "state": "ready",
        "members": [{"id": "0001other", "address": bait_address}], "cluster": "default",
        "caps": {}, "rtt": {},
    })  # fmt: skip
    real = ClusterKeys.of(Path(cluster.nodes[0].env["RINGINFER_SECRET_FILE"]).read_text().strip())
    public, private = zmq.curve_keypair()
    # Plain ZeroMQ; CURVE with another cluster's keys; CURVE that knows the daemons' public
    # key but not the secret (only the check of its messages' key can turn this one away).
    knows_server = ClusterKeys.client(bytes(32), real.server_public).member(public, private)
    strangers = [None, ClusterKeys.of(new_secret()), knows_server]
    ctx = zmq.Context()
    try:
        for keys in strangers:
            for d in cluster.nodes:
                sock = ctx.socket(zmq.DEALER)
                sock.setsockopt(zmq.LINGER, 0)
                if keys:
                    keys.connect_as_client(sock)
                sock.connect(f"tcp://{d.address}")
                for msg in (hello, message(Kind.STATUS), message(Kind.GENERATE, body={
                        "prompt": "hi", "max_tokens": 2, "sampling": {}})):  # fmt: skip
                    sock.send_multipart(encode(msg))
                assert not sock.poll(1500), "a stranger got a reply"
                sock.close()
        time.sleep(2.0)  # heartbeats and gossip would have dialled by now
    finally:
        ctx.destroy(linger=0)
        bait.close()
    assert dialled == []
    for d in cluster.nodes:
        status = d.status()
        assert len(status["nodes"]) == 2
        assert all(n["name"] != "stranger" for n in status["nodes"])
        assert status["stats"]["errors"].get("unauthenticated", 0) >= 1
        assert any("without this cluster's secret" in p["problem"] for p in status["problems"])
        assert status["live"]


class Tap:
    """A TCP relay between a client and a daemon that keeps every byte it passes."""

    def __init__(self, target: str) -> None:
        self.target, self.bytes = target, bytearray()
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen()
        self.address = f"127.0.0.1:{self.server.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            host, port = self.target.split(":")
            upstream = socket.create_connection((host, int(port)))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        while data := src.recv(65536):
            self.bytes += data
            dst.sendall(data)
        dst.close()


def generate_through_tap(address: str, env: dict[str, str]) -> bytes:
    tap = Tap(address)
    secret_prompt = "The secret word is platypus, and the capital of France is"
    proc = run_cli("generate", "--node", tap.address, "--max-tokens", "6", secret_prompt, env=env)
    assert proc.returncode == 0, proc.stderr
    tap.server.close()
    return bytes(tap.bytes)


def test_no_plaintext_on_the_wire_with_a_secret_and_plaintext_without(cluster, tmp_path):  # noqa: ANN001
    node = cluster.nodes[1]
    sealed = generate_through_tap(node.address, node.env)
    assert len(sealed) > 1000 and b"platypus" not in sealed and b"generate" not in sealed
    # The control: an --insecure daemon's traffic shows the prompt (so the tap does see it).
    seed_capabilities(tmp_path / "open")
    port = free_port()
    open_node = Daemon(tmp_path, "open", port, ["--host", "0.0.0.0", "--insecure", "--no-mdns"])
    try:
        open_node.address = f"127.0.0.1:{port}"
        Cluster(tmp_path, 1, [], nodes=[open_node])
        plain = generate_through_tap(open_node.address, {})
        assert b"platypus" in plain
        problems = open_node.status()["problems"]
        assert any("no cluster secret" in p["problem"] for p in problems), problems
    finally:
        open_node.stop()
    assert "--insecure" in open_node.text()
