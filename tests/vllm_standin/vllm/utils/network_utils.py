"""``vllm.utils.network_utils``: what TRL's vLLM client imports."""

import socket


def get_ip() -> str:
    """This machine's address as other hosts would reach it (loopback when there is no network)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("10.255.255.255", 1))
            return probe.getsockname()[0]
    except OSError:
        return "127.0.0.1"


def get_open_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
