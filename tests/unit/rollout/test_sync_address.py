"""Where rollout servers reach the trainer's weight-update store and group
(``rollout.weight_sync_address``, NCCL_SOCKET_IFNAME, the routing interface) — not
``gethostbyname(gethostname())``, which is 127.0.1.1 on many clusters."""
import socket
from types import SimpleNamespace

import pytest

from megatron_trapo.rollout.types import RolloutError
from megatron_trapo.rollout.weight_sync import sync_address

REMOTE = ["http://node7:30000", "http://node8:30000"]


def nic(address, family=socket.AF_INET):
    return SimpleNamespace(family=family, address=address)


@pytest.fixture
def interfaces(monkeypatch):
    import psutil

    table = {"lo": [nic("127.0.0.1")],
             "eno1": [nic("10.0.0.5")],  # management network
             "ib0": [nic("fe80::1", socket.AF_INET6), nic("192.168.50.5")],
             "ib1": [nic("192.168.51.5")]}
    monkeypatch.setattr(psutil, "net_if_addrs", lambda: table)
    monkeypatch.delenv("TRAPO_WEIGHT_SYNC_ADDR", raising=False)
    monkeypatch.delenv("NCCL_SOCKET_IFNAME", raising=False)
    return table


def test_configured_address_then_environment_win(interfaces, monkeypatch):
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "ib0")
    assert sync_address(REMOTE, "172.16.0.9") == "172.16.0.9"
    monkeypatch.setenv("TRAPO_WEIGHT_SYNC_ADDR", "172.16.0.10")
    assert sync_address(REMOTE) == "172.16.0.10"


def test_local_servers_get_loopback(interfaces):
    assert sync_address(["http://127.0.0.1:30000", "http://localhost:30001"]) == "127.0.0.1"


@pytest.mark.parametrize("ifname, expected", [
    ("ib0", "192.168.50.5"),     # prefix match, its IPv4 address (the IPv6 one skipped)
    ("ib", "192.168.50.5"),      # a prefix, as NCCL reads it
    ("=ib1", "192.168.51.5"),    # exact name
    ("eth,ib1", "192.168.51.5"),  # a list: the first interface that exists
])
def test_interface_named_by_nccl_socket_ifname(interfaces, monkeypatch, ifname, expected):
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", ifname)
    assert sync_address(REMOTE) == expected


def test_unknown_interface_is_a_clear_error(interfaces, monkeypatch):
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "=ib")  # exact: no interface is called "ib"
    with pytest.raises(RolloutError, match="NCCL_SOCKET_IFNAME==ib: no interface"):
        sync_address(REMOTE)


def test_routing_interface_otherwise(interfaces, monkeypatch):
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "^docker,lo")  # exclusions: use the route
    # 127.0.0.5 is not one of the loopback names, but routes through lo: the route is used
    assert sync_address(["http://127.0.0.5:30000"]) == "127.0.0.1"
    with pytest.raises(RolloutError, match="no interface routes to no-such-host.invalid"):
        sync_address(["http://no-such-host.invalid:30000"])


def test_hostname_lookup_is_not_used(interfaces, monkeypatch):
    def refuse(*a):
        raise AssertionError("sync_address resolved this machine's hostname")

    monkeypatch.setattr(socket, "gethostbyname", refuse)
    monkeypatch.setattr(socket, "gethostname", refuse)
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "ib1")
    assert sync_address(REMOTE) == "192.168.51.5"
