"""Child processes that never outlive their parent: servers, workers and databases that a
command or a test starts are gone when it ends, `kill -9` of the parent included.

Linux's PR_SET_PDEATHSIG asks the kernel to signal the child when its parent dies, however
it dies; on other systems the child is only stopped by `stop` (and atexit).
"""

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time

PR_SET_PDEATHSIG = 1
CLONE_NEWNET = 0x40000000


def _tie_to_parent(sig: int, parent: int, user: str | None, netns: str | None):
    def preexec() -> None:
        if netns is not None:  # as root, before any change of user: `ip netns add NAME` made it
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/var/run/netns/{netns}", os.O_RDONLY)
            if libc.setns(fd, CLONE_NEWNET) != 0:
                os._exit(1)
            os.close(fd)
        if user is not None:
            import pwd

            entry = pwd.getpwnam(user)
            os.initgroups(user, entry.pw_gid)
            os.setgid(entry.pw_gid)
            os.setuid(entry.pw_uid)  # before prctl: a change of user clears the death signal
        if sys.platform.startswith("linux"):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, sig)
            if os.getppid() != parent:  # the parent died before the signal was armed
                os._exit(1)
    return preexec


def start(args: list, *, death_signal: int = signal.SIGTERM, user: str | None = None,
          netns: str | None = None, **popen) -> subprocess.Popen:
    """`subprocess.Popen(args, **popen)`, signalled with `death_signal` when this process
    dies; run as `user` when given, and in the network namespace `netns` (a host of its own in
    tests) when given (this process must be root for either). Entering the namespace here,
    rather than through `ip netns exec`, keeps the death signal: a change of user after it
    would clear it."""
    return subprocess.Popen([str(a) for a in args],
                            preexec_fn=_tie_to_parent(death_signal, os.getpid(), user, netns), **popen)


def stop(proc: subprocess.Popen, timeout: float = 15, sig: int = signal.SIGTERM) -> None:
    """Ask `proc` to stop, and kill it if it has not within `timeout` seconds."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(what: str, ready, timeout: float, proc: subprocess.Popen | None = None, every: float = 0.2):
    """`ready()`'s first true value, polled until `timeout` seconds; fails if `proc` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: the process exited with code {proc.returncode}")
        value = ready()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"{what}: not ready after {timeout:g} s")
