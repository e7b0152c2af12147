"""Members have identities: a member speaks for its own id only, a client credential for no
member, and key files stay their owner's. Real daemons, real processes, real sockets."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import zmq

from node.cluster.identities import Identities, decide
from node.cluster.secret import ClusterKeys, key_bits, new_secret, zap_reply
from protocol.wire import Kind, Message, message
from tests.conftest import run_cli
from tests.daemons import Cluster
from tests.test_secret import PROMPT, one_line_error


def test_who_may_say_what():
    ok = None
    assert decide(Kind.GENERATE, None, True, None, False, None) is ok
    assert decide(Kind.BYE, "a", True, None, False, None)[0] == "forbidden"
    assert decide(Kind.PING, "a", False, None, False, None)[0] == "unauthenticated"
    assert decide(Kind.HELLO, "a", False, None, True, None) is ok  # a first proven HELLO
    assert decide(Kind.HELLO, "a", False, None, True, "k2")[0] == "forbidden"  # a's is k2
    assert decide(Kind.BYE, "a", False, "", False, None)[0] == "forbidden"  # before its HELLO
    assert decide(Kind.BYE, "b", False, "a", False, "k2")[0] == "forbidden"
    assert decide(Kind.BYE, "a", False, "a", False, "self") is ok
    assert decide(Kind.FORWARD, None, False, "a", False, None) is ok
    assert decide(Kind.FORWARD, None, True, None, False, None)[0] == "forbidden"


def test_an_id_is_bound_to_its_first_key_until_its_member_is_lost():
    keys = ClusterKeys.of(new_secret())
    ids = Identities(keys)
    first, second = (keys.member(*zmq.curve_keypair()) for _ in range(2))

    def hello(k: ClusterKeys) -> Message:
        return message(Kind.HELLO, body={"id": "a", "proof": k.proof()})

    assert ids.check(first.public.decode(), hello(first)) is None
    assert ids.check(second.public.decode(), hello(second))[0] == "forbidden"
    ids.forget("a")  # its member left or went silent: a remade node.key may take the id
    assert ids.check(second.public.decode(), hello(second)) is None
    assert ids.check(first.public.decode(), hello(first))[0] == "forbidden"


def test_secrets_need_128_bits_and_adverts_need_no_secret():
    assert key_bits(new_secret()) == 256 and key_bits("0" * 64) == 0
    assert key_bits("ab" * 40) == 0 and key_bits("correct horse") < 128
    keys = ClusterKeys.of(new_secret())
    # the transfer socket's handshakes: a proven member's key only
    request = [b"1.0", b"1", b"ringinfer-transfer", b"10.0.0.1", b"", b"CURVE",
               bytes(32)]  # fmt: skip
    assert not zap_reply(request, keys, set())[1]
    member = "0" * 40  # z85 of 32 zero bytes
    assert zap_reply(request, keys, {member})[1]
    assert zap_reply([*request[:2], b"ringinfer", *request[3:]], keys, set())[1]


def test_short_secrets_and_client_keys_start_no_daemon(tmp_path: Path):
    for weak in ("a" * 64, "password" * 4):  # long enough for the old rule, not random
        (tmp_path / "weak").write_text(weak)
        one_line_error(run_cli("daemon", "--secret-file", str(tmp_path / "weak"), "--data-dir",
                               str(tmp_path / "d"), "--api", "off"), "needs 128")  # fmt: skip
    (tmp_path / "cluster.key").write_text(new_secret())
    client = tmp_path / "client.key"
    made = run_cli("secret", "--client", "--secret-file", str(tmp_path / "cluster.key"),
                   "--out", str(client))  # fmt: skip
    assert made.returncode == 0, made.stderr
    assert client.stat().st_mode & 0o777 == 0o600
    one_line_error(run_cli("daemon", "--secret-file", str(client), "--data-dir",
                           str(tmp_path / "d"), "--api", "off"), "is a client key")  # fmt: skip
    # `ringinfer secret > file`: the shell makes the file, the command makes it 0600
    out = tmp_path / "redirected.key"
    shell = f"{sys.executable} -m node.cli secret > {out}"
    assert subprocess.run(shell, shell=True, cwd=Path(__file__).parent.parent).returncode == 0
    assert out.stat().st_mode & 0o777 == 0o600 and key_bits(out.read_text().strip()) == 256


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    root = tmp_path_factory.mktemp("identities")
    secret = root / "cluster.key"
    secret.write_text(new_secret())
    secret.chmod(0o640)  # group-readable: each daemon warns
    client = root / "client.key"
    made = run_cli("secret", "--client", "--secret-file", str(secret), "--out", str(client))
    assert made.returncode == 0, made.stderr
    c = Cluster(root, 2, ["--objective", "throughput", "--secret-file", str(secret)])
    c.secret, c.client = secret, client
    yield c
    c.stop()


def rogue(cluster: Cluster, key_file: Path, as_member: bool) -> list[list[str]]:
    """What tests/rogue.py got back after speaking to node1 in node2's name."""
    target, victim = cluster.nodes[0], cluster.nodes[1].status()["node"]
    cmd = [sys.executable, "-m", "tests.rogue", target.address, str(key_file), victim]
    proc = subprocess.run([*cmd, *(["--member"] if as_member else [])], capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def unchanged(cluster: Cluster, before: dict) -> None:
    after = cluster.nodes[0].status()
    assert after["live"] and after["epoch"] == before["epoch"]
    assert sorted(n["id"] for n in after["nodes"]) == sorted(n["id"] for n in before["nodes"])
    assert all(n["state"] != "leaving" for n in after["nodes"])


def test_a_member_cannot_speak_for_another(cluster):  # noqa: ANN001
    before = cluster.nodes[0].status()
    victim = cluster.nodes[1].status()["node"]
    replies = rogue(cluster, cluster.secret, as_member=True)
    assert [kind for kind, _ in replies] == ["manifest_reply"]  # refusals are not answered
    unchanged(cluster, before)
    log = cluster.nodes[0].text()
    for kind in ("hello", "bye", "ping", "plan", "plan_ack"):
        lines = [line for line in log.splitlines()
                 if f"refused {kind} from" in line and f"in the name of {victim}" in line]
        assert len(lines) == 1, (kind, lines)  # sent twice, logged once
    assert cluster.nodes[0].status()["stats"]["errors"]["forbidden"] >= 10


def test_a_client_credential_generates_and_is_never_a_member(cluster):  # noqa: ANN001
    node = cluster.nodes[1]
    local = run_cli("generate", "--local", "--json", "--max-tokens", "8", PROMPT)
    ring = run_cli("generate", "--node", node.address, "--secret-file", str(cluster.client),
                   "--json", "--max-tokens", "8", PROMPT)  # fmt: skip
    assert ring.returncode == 0, ring.stderr
    assert json.loads(ring.stdout)["tokens"] == json.loads(local.stdout)["tokens"]
    status = run_cli("status", "--node", node.address, "--secret-file", str(cluster.client))
    assert status.returncode == 0, status.stderr
    before = cluster.nodes[0].status()
    replies = rogue(cluster, cluster.client, as_member=False)
    assert replies and all(r == ["error", "forbidden"] for r in replies), replies
    unchanged(cluster, before)
    log = cluster.nodes[0].text()
    for kind in ("hello", "bye", "ping", "plan", "plan_ack"):
        assert log.count(f"a client credential cannot send {kind}\n") == 1, kind


def test_key_files_are_their_owners(cluster):  # noqa: ANN001
    for d in cluster.nodes:
        assert (d.data_dir / "node.key").stat().st_mode & 0o777 == 0o600
        assert f"{cluster.secret} is readable by other users" in d.text()
    keys = {(d.data_dir / "node.key").read_text() for d in cluster.nodes}
    assert len(keys) == 2  # each daemon its own

