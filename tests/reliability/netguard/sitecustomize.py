"""Put this folder on PYTHONPATH to cut a process (and its Python children) off the network.

Any DNS lookup of a non-loopback name or connect/sendto to a non-loopback address raises OSError and is
appended to the file named by TELEKD_NETGUARD_LOG (one line: pid, what, where), so a test can assert that
nothing even tried. Loopback (127.0.0.0/8, ::1, localhost) and Unix sockets stay allowed.
"""

import ipaddress
import os
import socket

_LOG = os.environ.get("TELEKD_NETGUARD_LOG")


def _loopback(host) -> bool:
    if host in (None, "", "localhost", b"localhost"):
        return True
    try:
        return ipaddress.ip_address(host.decode() if isinstance(host, bytes) else host).is_loopback
    except ValueError:
        return False


def _refuse(what: str, where) -> None:
    if _LOG:
        with open(_LOG, "a", encoding="utf-8") as f:
            f.write(f"{os.getpid()} {what} {where!r}\n")
    raise OSError(f"network disabled by tests/reliability/netguard: {what} {where!r}")


_getaddrinfo = socket.getaddrinfo


def getaddrinfo(host, *args, **kwargs):
    if not _loopback(host):
        _refuse("getaddrinfo", host)
    return _getaddrinfo(host, *args, **kwargs)


class GuardedSocket(socket.socket):
    def _check(self, what, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and not _loopback(address[0]):
            _refuse(what, address)

    def connect(self, address):
        self._check("connect", address)
        return super().connect(address)

    def connect_ex(self, address):
        self._check("connect", address)
        return super().connect_ex(address)

    def sendto(self, data, *args):
        self._check("sendto", args[-1])
        return super().sendto(data, *args)


socket.getaddrinfo = getaddrinfo
socket.socket = GuardedSocket
