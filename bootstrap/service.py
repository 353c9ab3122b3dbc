"""The introducer: nodes register and refresh; it answers with a sample of live members.

Optional by design: it holds no protocol state, only who registered lately, so losing it never
stops a running cluster (members know each other through gossip) and a node can always join
through any live member instead. Registrations are signed with the cluster key.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import trio

from daemon.asgi import HTTPError, Request, Response, Router
from daemon.core.messages import MemberEntry
from daemon.digest import EMPTY_DIGEST, digest_of
from daemon.logs import fields, short_id
from daemon.security import Authenticator, AuthError
from daemon.wire import entry_from_json, entry_to_json

log = logging.getLogger("kelipsfs.bootstrap")

SAMPLE = 16
MAX_REGISTRATIONS = 100_000


@dataclass
class _Registration:
    entry: MemberEntry
    expires: float


class Introducer:
    """Registrations with expiry; k and cluster id are fixed by the first registration."""

    def __init__(self, auth: Authenticator, ttl: float = 30.0,
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self.auth = auth
        self.ttl = ttl
        self.clock = clock
        self.wall = wall
        self.k: int | None = None
        self.cluster_id: str | None = None
        self.members: dict[bytes, _Registration] = {}
        self.rng = random.Random()

    def _expire(self) -> None:
        now = self.clock()
        for node_id in [n for n, r in self.members.items() if r.expires <= now]:
            self._log("registration expired", "registration_expired",
                      self.members.pop(node_id).entry)

    def live(self, exclude: bytes | None = None) -> list[MemberEntry]:
        self._expire()
        entries = [r.entry for n, r in self.members.items() if n != exclude]
        self.rng.shuffle(entries)
        return entries[:SAMPLE]

    def register(self, entry: MemberEntry, k: int, cluster_id: str) -> list[MemberEntry]:
        if self.k is None:
            self.k, self.cluster_id = k, cluster_id
        if k != self.k or cluster_id != self.cluster_id:
            raise HTTPError(409, f"refused: this cluster is {self.cluster_id!r} with k={self.k}, "
                                 f"the node has {cluster_id!r} with k={k}")
        self._expire()
        if entry.node_id not in self.members and len(self.members) >= MAX_REGISTRATIONS:
            raise HTTPError(503, "too many registrations")
        sample = self.live(exclude=entry.node_id)
        if entry.node_id not in self.members:
            self._log("member registered", "member_registered", entry)
        self.members[entry.node_id] = _Registration(entry, self.clock() + self.ttl)
        return sample

    @staticmethod
    def _log(message: str, event: str, entry: MemberEntry) -> None:
        log.info(message, extra=fields(event=event, member=short_id(entry.node_id),
                                       address=f"{entry.host}:{entry.port}"))

    def app(self) -> Router:
        router = Router()

        async def register(req: Request) -> Response:
            body = await req.body(64 * 1024)
            self._verify(req, digest_of(body))
            try:
                doc = json.loads(body)
                entry = entry_from_json(doc["entry"])
                k = int(doc["k"])
                cluster_id = str(doc["cluster_id"])
            except (ValueError, KeyError, TypeError) as exc:
                raise HTTPError(400, f"malformed registration: {exc}") from exc
            sample = self.register(entry, k, cluster_id)
            return Response.json({"members": [entry_to_json(e) for e in sample]})

        async def members(req: Request) -> Response:
            self._verify(req, EMPTY_DIGEST)
            return Response.json({"members": [entry_to_json(e) for e in self.live()],
                                  "k": self.k, "cluster_id": self.cluster_id})

        router.add("POST", "/v1/register", register)
        router.add("GET", "/v1/members", members)
        return router

    def _verify(self, req: Request, sha: bytes) -> None:
        try:
            self.auth.verify_request(req.method, req.target, req.headers, sha, self.wall())
        except AuthError as exc:
            raise HTTPError(401, f"request not authenticated: {exc}") from exc


async def serve_bootstrap(introducer: Introducer, listen: tuple[str, int], *,
                          task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    from daemon.api import serve_http
    await serve_http(introducer.app(), listen, task_status=task_status)
