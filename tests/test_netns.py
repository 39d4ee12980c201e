"""precopy.lab.netns: two namespaces joined by a shaped veth pair (root only for the live part)."""

import os
import subprocess

import pytest

from precopy.lab.netns import TwoHosts, rate_bits_per_s, unavailable_reason


def test_rate_parsing():
    assert rate_bits_per_s("1gbit") == 1e9
    assert rate_bits_per_s("500mbit") == 5e8
    assert rate_bits_per_s("64kbit") == 64e3
    with pytest.raises(ValueError, match="tc rate"):
        rate_bits_per_s("fast")


def test_names_are_checked_and_subnets_differ():
    with pytest.raises(ValueError):
        TwoHosts("a name with spaces")
    a, b = TwoHosts("pcA"), TwoHosts("pcB")
    assert a.dst_ip != b.dst_ip and a.src_ip != a.dst_ip


@pytest.mark.skipif(unavailable_reason() is not None, reason=f"{unavailable_reason()}")
def test_two_hosts_reach_each_other_and_clean_up():
    hosts = TwoHosts(f"pcn{os.getpid() % 10_000_000}", rate="100mbit")  # concurrent runs: their own
    with hosts:
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert hosts.src_ns in listed and hosts.dst_ns in listed
        qdisc = subprocess.run(hosts.exec_prefix(hosts.src_ns) + ["tc", "qdisc", "show"],
                               capture_output=True, text=True).stdout
        assert "tbf" in qdisc and "100Mbit" in qdisc
        # a listener in the destination namespace answers a client in the source namespace
        server = subprocess.Popen(hosts.exec_prefix(hosts.dst_ns) + [
            "python3", "-c",
            "import socket,sys; s=socket.socket(); s.bind((sys.argv[1], 5601)); s.listen(); "
            "print('ready', flush=True); c,_=s.accept(); c.sendall(c.recv(5)); c.close()",
            hosts.dst_ip], stdout=subprocess.PIPE, text=True)
        try:
            assert server.stdout.readline().strip() == "ready"
            client = subprocess.run(hosts.exec_prefix(hosts.src_ns) + [
                "python3", "-c",
                "import socket,sys; c=socket.create_connection((sys.argv[1], 5601), timeout=5); "
                "c.sendall(b'hello'); print(c.recv(5).decode())", hosts.dst_ip],
                capture_output=True, text=True, timeout=20)
            assert client.stdout.strip() == "hello", client.stderr
        finally:
            server.kill()
            server.wait()
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert hosts.src_ns not in listed and hosts.dst_ns not in listed
