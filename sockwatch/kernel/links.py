"""The BPF links sockwatch holds, each with what it attaches and where.

A link belongs to its file descriptor: closing it (or sockwatch's exit, however it
exits) detaches the program. Cgroup and tracepoint links live as long as the agent;
a network namespace's link is released when the namespace goes (the kernel has
already detached it then: a netns link does not keep its namespace alive).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    kind: str  # "cgroup", "tracepoint", "raw_tracepoint", "tracing" (tp_btf) or "netns"
    name: str  # the cgroup's path, the tracepoint, or the namespace's inode
    cookie: int = 0  # a namespace's cookie (its identity: inodes are reused)


@dataclass
class Link:
    fd: int
    what: str  # the hook, as doctor and the logs name it
    target: Target


class Links:
    """Every link sockwatch holds. Nothing else closes a link's descriptor."""

    def __init__(self) -> None:
        self._links: list[Link] = []

    def add(self, fd: int, what: str, target: Target) -> Link:
        link = Link(fd, what, target)
        self._links.append(link)
        return link

    def __len__(self) -> int:
        return len(self._links)

    def __iter__(self) -> Iterator[Link]:
        return iter(list(self._links))

    def netns_cookies(self) -> set[int]:
        """The namespaces a link is attached to."""
        return {link.target.cookie for link in self._links if link.target.kind == "netns"}

    def remove(self, link: Link) -> None:
        """Close one link (the kernel detaches its program)."""
        if link in self._links:
            self._links.remove(link)
            os.close(link.fd)

    def release_netns(self, cookie: int) -> int:
        """Close the links of one namespace; how many there were."""
        mine = [link for link in self._links if link.target.kind == "netns" and link.target.cookie == cookie]
        for link in mine:
            self._links.remove(link)
            os.close(link.fd)
        return len(mine)

    def close(self) -> None:
        while self._links:
            os.close(self._links.pop().fd)
