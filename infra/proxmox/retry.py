"""Bounded retries of Proxmox API calls that a network fault cut short.

A call whose connection dropped, or whose answer did not come within the request timeout,
raises a `TransientFault` (client.py's `ProxmoxTransientError`). Sending the same call again
may cure it, but only some calls may simply be sent again:

- calls that change nothing (GETs: lists, configs, task status, guest-agent queries; the
  password login) go through `retried`: sent again `Backoff.tries` times at most, waiting
  longer each time;
- calls that change something (clone, config, start, destroy) may have been carried out even
  though their answer was lost. The provider sends them again only after PVE has settled and
  it has read back whether the change happened (provider.py, `_locked_retry`).

    backoff = Backoff(tries=5, first_delay_s=0.5)
    nodes = retried(lambda: api_get(api, "nodes"), backoff)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


class TransientFault(Exception):
    """A failure that sending the same call again may cure; `tries`: how often it was sent."""

    tries: int = 1


@dataclass(frozen=True)
class Backoff:
    """How often a call is sent at most, and how long to wait in between (doubling, capped)."""

    tries: int = 5
    first_delay_s: float = 0.5
    max_delay_s: float = 8.0

    def delays(self) -> Iterator[float]:
        """The waits between the tries: one fewer than `tries`."""
        delay = self.first_delay_s
        for _ in range(self.tries - 1):
            yield delay
            delay = min(delay * 2, self.max_delay_s)


def retried(action: Callable[[], T], backoff: Backoff) -> T:
    """`action()`, sent again after each TransientFault up to `backoff.tries` times in all.

    The last fault is raised with its `tries` set, so its message can say how often.
    """
    for tries, delay in enumerate([*backoff.delays(), None], start=1):
        try:
            return action()
        except TransientFault as fault:
            if delay is None:
                fault.tries = tries
                raise
        time.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover
