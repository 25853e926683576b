"""Open-file budget: thousands of requests in flight need thousands of sockets.

Each request on the wire holds one socket, and so one file descriptor, in the collector and
in the agent. Linux's default soft limit (1,024) is far below what a few thousand rollouts in
flight need, while the hard limit a user may raise it to without privileges is usually much
higher. So both processes raise the soft limit to the hard one at start, and a budget that
cannot fit even then is refused up front with the numbers and the fix, instead of failing
later as a stream of "Too many open files" connection errors.
"""

from __future__ import annotations

import resource

from rollouts.errors import ConfigError

# Descriptors a process needs beside its sockets to the agent: Python and its imports, log and
# chunk files, Prefect's API connections, the event loop's own.
FD_HEADROOM = 256


def raise_open_file_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit; return the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft == resource.RLIM_INFINITY or soft < hard:
        # An infinite hard limit cannot be a soft one on Linux (EPERM above nr_open): keep
        # what we have then, which is already large.
        target = hard if hard != resource.RLIM_INFINITY else soft
        if target != soft:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
                soft = target
            except (ValueError, OSError):
                pass  # a container may forbid it: the check below says what that means
    return soft


def ensure_fd_budget(connections: int, who: str = "the collector") -> None:
    """Raise the soft limit, then refuse when ``connections`` sockets cannot fit under it."""
    soft = raise_open_file_limit()
    if soft == resource.RLIM_INFINITY or connections + FD_HEADROOM <= soft:
        return
    raise ConfigError(
        f"{connections} requests in flight need about {connections + FD_HEADROOM} open files "
        f"in {who}, but this process may open at most {soft} (`ulimit -n`, raised to the hard "
        "limit where allowed). "
        f"Lower num_samples_in_parallel to at most {max(1, soft - FD_HEADROOM)}, raise the "
        "limit (`ulimit -Hn` as root, or LimitNOFILE= in a systemd unit), or split the "
        "budget over processes."
    )
