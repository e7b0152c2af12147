"""Measured capabilities, cached in the data dir; mDNS adverts; interface choice."""

from __future__ import annotations

import json

import pytest
import torch

from discovery.capabilities import CACHE_FILE, load_or_measure
from discovery.interfaces import Interface, best_address, lan_interfaces
from discovery.mdns import Advert
from node.engine.weights import open_checkpoint
from node.errors import RinginferError


def test_capabilities_are_measured_once_then_read_from_the_data_dir(tmp_path):  # noqa: ANN001
    cpu = torch.device("cpu")
    first, fresh = load_or_measure(tmp_path, cpu, torch.float32)
    assert fresh and first.flops > 1e8 and first.bandwidth > 1e7 and first.device == "cpu"
    assert 0 < first.layer_overhead_s < 0.1 and first.memory_total >= first.memory_available > 0
    again, fresh = load_or_measure(tmp_path, cpu, torch.float32)
    assert not fresh and (again.flops, again.bandwidth) == (first.flops, first.bandwidth)
    # another dtype is another measurement; so is asking for one, or a corrupt cache
    assert load_or_measure(tmp_path, cpu, torch.bfloat16)[1]
    assert load_or_measure(tmp_path, cpu, torch.bfloat16, remeasure=True)[1]
    (tmp_path / CACHE_FILE).write_text("{not json")
    assert load_or_measure(tmp_path, cpu, torch.bfloat16)[1]
    cache = json.loads((tmp_path / CACHE_FILE).read_text())
    (tmp_path / CACHE_FILE).write_text(json.dumps({**cache, "flops": "fast"}))
    assert load_or_measure(tmp_path, cpu, torch.bfloat16)[1]
    assert json.loads((tmp_path / CACHE_FILE).read_text())["key"]["dtype"] == "torch.bfloat16"


def test_adverts_round_trip_through_txt_and_bad_ones_are_refused():
    advert = Advert("0123456789abcdef", "box", "0.1.0", 2, 7710, "lab", "cuda", 2**36,
                    2**35, 1.5e12, 9e11, ("SmolLM2-135M-Instruct",), "10.0.0.5")  # fmt: skip
    txt = advert.txt()
    assert all(isinstance(v, str) and len(k) + len(v) < 255 for k, v in txt.items())
    back = Advert.from_txt(txt, "10.0.0.5", "box-01234567")
    assert back is not None and back.endpoint == "10.0.0.5:7710"
    assert (back.cluster, back.models, back.memory_total) == ("lab", advert.models, 2**36)
    assert Advert.from_txt({**txt, "port": "x"}, "10.0.0.5") is None
    assert Advert.from_txt({k: v for k, v in txt.items() if k != "id"}, "10.0.0.5") is None


def test_lan_interfaces_skip_loopback_and_bridges_unless_named():
    assert Interface("docker0", "172.17.0.1", 16).virtual
    assert Interface("lo", "127.0.0.1", 8).virtual
    assert not Interface("eth0", "192.168.1.4", 24).virtual
    assert all(not i.virtual for i in lan_interfaces())
    assert [i.address for i in lan_interfaces(["lo"])] == ["127.0.0.1"]
    with pytest.raises(RinginferError, match="no IPv4 interface nope0"):
        lan_interfaces(["nope0"])
    ours = [Interface("eth0", "192.168.1.4", 24)]
    assert best_address(["10.8.0.2", "192.168.1.9"], ours) == "192.168.1.9"
    assert best_address(["10.8.0.2"], ours) == "10.8.0.2"


def test_the_served_models_layer_is_timed_once_and_cached_per_model(tmp_path, tiny_models):  # noqa: ANN001
    cpu = torch.device("cpu")
    for family, fmt in (("llama", "none"), ("gpt2", "none"), ("llama", "int4")):
        ckpt = open_checkpoint(str(tiny_models[family]))
        model = (ckpt.name, ckpt.family, ckpt.config, fmt)
        caps, fresh = load_or_measure(tmp_path, cpu, torch.float32, model=model)
        assert fresh and 0 < caps.layer_s < 1
        again, fresh = load_or_measure(tmp_path, cpu, torch.float32, model=model)
        assert not fresh and again.layer_s == caps.layer_s
    assert len(json.loads((tmp_path / CACHE_FILE).read_text())["layer_s"]) == 3
