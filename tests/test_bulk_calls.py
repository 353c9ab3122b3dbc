"""Small calls over kept bulk connections (daemon.bulk_calls) against an in-process server."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio

from daemon import bulk, bulk_calls
from daemon.bulk import BulkError
from daemon.bulk_calls import CallPool

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class EchoApp:
    """Answers every request with its method, path and body; counts connections served."""

    def __init__(self) -> None:
        self.connections = 0
        self.calls = 0

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.calls += 1
        doc = json.dumps({"method": scope["method"], "path": scope["path"],
                          "body": body.decode()}).encode()
        headers = [(b"content-type", b"application/json")]
        if scope["path"] != "/unsized":
            headers.append((b"content-length", str(len(doc)).encode()))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": doc})


async def serve(app: EchoApp, nursery: trio.Nursery) -> tuple[str, int]:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]

    async def handler(stream: trio.SocketStream) -> None:
        app.connections += 1
        await bulk.serve_connection(stream, app, None, 5.0)

    nursery.start_soon(trio.serve_listeners, handler, listeners)
    return "127.0.0.1", port


def run(test: Callable[[EchoApp, tuple[str, int], CallPool], Awaitable[None]]) -> None:
    async def main() -> None:
        app = EchoApp()
        pool = CallPool(5.0)
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                address = await serve(app, nursery)
                try:
                    await test(app, address, pool)
                finally:
                    await pool.aclose()
                    nursery.cancel_scope.cancel()
    trio.run(main)


def test_calls_in_turn_share_one_connection() -> None:
    async def calls(app: EchoApp, address: tuple[str, int], pool: CallPool) -> None:
        for i in range(50):
            status, headers, body = await pool.call(address, "POST", f"/echo/{i}", {},
                                                    f"body {i}".encode())
            assert status == 200 and headers["content-type"] == "application/json"
            assert json.loads(body) == {"method": "POST", "path": f"/echo/{i}",
                                        "body": f"body {i}"}
        assert (app.calls, app.connections) == (50, 1)
    run(calls)


def test_concurrent_calls_each_get_a_connection_and_answers_do_not_mix() -> None:
    async def calls(app: EchoApp, address: tuple[str, int], pool: CallPool) -> None:
        answers: dict[int, Any] = {}

        async def one(i: int) -> None:
            _, _, body = await pool.call(address, "GET", f"/n/{i}", {}, b"x" * i)
            answers[i] = json.loads(body)

        for _ in range(3):
            async with trio.open_nursery() as nursery:
                for i in range(20):
                    nursery.start_soon(one, i)
        assert all(answers[i] == {"method": "GET", "path": f"/n/{i}", "body": "x" * i}
                   for i in range(20))
        assert app.calls == 60 and app.connections <= 20 + 2 * (20 - bulk_calls.IDLE_PER_PEER)
    run(calls)


def test_a_connection_the_server_closed_while_idle_is_replaced(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bulk, "IDLE_SECONDS", 0.05)

    async def calls(app: EchoApp, address: tuple[str, int], pool: CallPool) -> None:
        await pool.call(address, "POST", "/a", {}, b"1")
        await trio.sleep(0.3)  # the server has closed the kept connection by now
        status, _, body = await pool.call(address, "POST", "/b", {}, b"2")
        assert status == 200 and json.loads(body)["path"] == "/b"
        assert (app.calls, app.connections) == (2, 2)
    run(calls)


def test_an_answer_without_a_length_is_read_to_the_end_and_not_kept() -> None:
    async def calls(app: EchoApp, address: tuple[str, int], pool: CallPool) -> None:
        for _ in range(2):
            status, _, body = await pool.call(address, "GET", "/unsized", {}, b"")
            assert status == 200 and json.loads(body)["path"] == "/unsized"
        assert app.connections == 2
    run(calls)


def test_nobody_listening_is_a_bulk_error() -> None:
    async def main() -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        await listeners[0].aclose()
        pool = CallPool(2.0)
        with pytest.raises(BulkError, match="cannot connect"):
            await pool.call(("127.0.0.1", port), "GET", "/x", {}, b"")
        await pool.aclose()
    trio.run(main)
