"""The trio ↔ grpcio bridge, served for real over a unix socket, without protos.

A hand-written ``add_EchoServicer_to_server`` does what grpcio-tools'
generated code does, with bytes and integers as messages, so the bridge is
tested on its own: the four RPC shapes, the error mapping, the namespace
check, undecodable requests and cancellation when the client goes away.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import AsyncIterator, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
import trio

from ckfs.errors import NotFound
from ckfs.services.bridge import Bridge, Call, LoggingInterceptor

SERVICE = "test.Echo"


def _int(raw: bytes) -> int:
    return int(raw.decode("ascii"))  # ValueError for anything but digits


def _bytes(value: int) -> bytes:
    return str(value).encode()


def add_EchoServicer_to_server(servicer: Any, server: Any) -> None:
    """What grpcio-tools generates, for a service of integers as text."""
    handlers = {
        "Double": grpc.unary_unary_rpc_method_handler(
            servicer.Double, request_deserializer=_int, response_serializer=_bytes
        ),
        "Missing": grpc.unary_unary_rpc_method_handler(
            servicer.Missing, request_deserializer=_int, response_serializer=_bytes
        ),
        "Count": grpc.unary_stream_rpc_method_handler(
            servicer.Count, request_deserializer=_int, response_serializer=_bytes
        ),
        "Sum": grpc.stream_unary_rpc_method_handler(
            servicer.Sum, request_deserializer=_int, response_serializer=_bytes
        ),
        "Running": grpc.stream_stream_rpc_method_handler(
            servicer.Running, request_deserializer=_int, response_serializer=_bytes
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)


class Echo:
    """The service: what each shape of RPC looks like on the trio side."""

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.stream_ended = trio.Event()
        self.produced = 0
        self.sleeper_ended = trio.Event()
        self.sum_ended = trio.Event()

    async def Double(self, request: int, call: Call) -> int:
        self.calls.append(call)
        if request < 0:
            raise NotFound(f"no such number: {request}\x1b[31m")
        if request == 13:
            raise RuntimeError("a bug")
        if request == 7:
            try:
                await trio.sleep_forever()
            finally:
                self.sleeper_ended.set()
        return request * 2

    async def Count(self, request: int, call: Call) -> AsyncIterator[int]:
        try:
            for i in range(request):
                yield i
                self.produced += 1
            if request == 3:
                raise NotFound("three is unlucky")
        finally:
            self.stream_ended.set()

    async def Sum(self, requests: AsyncIterator[int], call: Call) -> int:
        try:
            return sum([r async for r in requests])
        finally:
            self.sum_ended.set()

    async def Running(self, requests: AsyncIterator[int], call: Call) -> AsyncIterator[int]:
        total = 0
        async for r in requests:
            total += r
            yield total


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[grpc.Channel, Echo]]:
    service = Echo()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=4), interceptors=[LoggingInterceptor()]
    )
    async with trio.open_nursery() as nursery:
        Bridge(nursery).add(server, service, add_EchoServicer_to_server)
        address = f"unix://{tmp_path}/echo.sock"
        server.add_insecure_port(address)
        server.start()
        channel = grpc.insecure_channel(address)
        try:
            yield channel, service
        finally:
            channel.close()
            await trio.to_thread.run_sync(server.stop(1).wait)


def _unary(channel: grpc.Channel, method: str) -> Any:
    return channel.unary_unary(f"/{SERVICE}/{method}")


async def _in_thread(fn: Any, *args: Any, **kwargs: Any) -> Any:
    return await trio.to_thread.run_sync(lambda: fn(*args, **kwargs))


async def test_unary_answers_and_sees_the_namespace(served: tuple[grpc.Channel, Echo]) -> None:
    channel, service = served
    assert await _in_thread(_unary(channel, "Double"), b"21") == b"42"
    assert service.calls[-1].namespace == "default"
    assert service.calls[-1].method == f"/{SERVICE}/Double"
    metadata = (("containerd-namespace", "default"), ("x-other", "v"))
    assert await _in_thread(_unary(channel, "Double"), b"1", metadata=metadata) == b"2"
    assert service.calls[-1].metadata["x-other"] == "v"


async def _status(fn: Any, *args: Any, **kwargs: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        await _in_thread(fn, *args, **kwargs)
    return info.value.code(), info.value.details()


async def test_errors_map_to_codes_with_one_safe_line(served: tuple[grpc.Channel, Echo]) -> None:
    channel, _ = served
    code, details = await _status(_unary(channel, "Double"), b"-1")
    assert code == grpc.StatusCode.NOT_FOUND
    assert details == "no such number: -1\\x1b[31m"
    code, details = await _status(_unary(channel, "Double"), b"13")
    assert code == grpc.StatusCode.INTERNAL
    assert "a bug" not in details and "RuntimeError" in details
    code, details = await _status(_unary(channel, "Double"), b"not a number")
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "malformed request" in details
    code, _ = await _status(_unary(channel, "Missing"), b"1")
    assert code == grpc.StatusCode.UNIMPLEMENTED
    code, _ = await _status(_unary(channel, "Nonesuch"), b"1")
    assert code == grpc.StatusCode.UNIMPLEMENTED


async def test_other_namespaces_are_refused(served: tuple[grpc.Channel, Echo]) -> None:
    channel, service = served
    for namespace in ("k8s.io", "", "a" * 4096):
        metadata = (("containerd-namespace", namespace),)
        code, details = await _status(_unary(channel, "Double"), b"1", metadata=metadata)
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        assert "only the 'default' namespace" in details
        assert len(details) < 400
    assert service.calls == []


async def test_unnamespaced_services_skip_the_check(tmp_path: Path) -> None:
    class Free(Echo):
        NAMESPACED = False

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    async with trio.open_nursery() as nursery:
        service = Free()
        Bridge(nursery).add(server, service, add_EchoServicer_to_server)
        server.add_insecure_port(f"unix://{tmp_path}/s.sock")
        server.start()
        with grpc.insecure_channel(f"unix://{tmp_path}/s.sock") as channel:
            metadata = (("containerd-namespace", "k8s.io"),)
            assert await _in_thread(_unary(channel, "Double"), b"2", metadata=metadata) == b"4"
        assert service.calls[-1].namespace == "k8s.io"
        await trio.to_thread.run_sync(server.stop(1).wait)


async def test_server_stream_in_order_and_its_error(served: tuple[grpc.Channel, Echo]) -> None:
    channel, _ = served
    count = channel.unary_stream(f"/{SERVICE}/Count")
    assert await _in_thread(lambda: list(count(b"5"))) == [b"0", b"1", b"2", b"3", b"4"]
    assert await _in_thread(lambda: list(count(b"0"))) == []
    seen: list[bytes] = []
    code, details = await _status(lambda: seen.extend(count(b"3")))
    assert seen == [b"0", b"1", b"2"]
    assert (code, details) == (grpc.StatusCode.NOT_FOUND, "three is unlucky")


async def test_client_streams(served: tuple[grpc.Channel, Echo]) -> None:
    channel, _ = served
    total = channel.stream_unary(f"/{SERVICE}/Sum")
    assert await _in_thread(total, iter([b"1", b"2", b"3"])) == b"6"
    assert await _in_thread(total, iter([])) == b"0"
    code, _ = await _status(total, iter([b"1", b"x"]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    running = channel.stream_stream(f"/{SERVICE}/Running")
    assert await _in_thread(lambda: list(running(iter([b"1", b"2", b"3"])))) == [
        b"1",
        b"3",
        b"6",
    ]


async def test_a_client_going_away_cancels_the_service(
    served: tuple[grpc.Channel, Echo],
) -> None:
    channel, service = served
    responses = channel.unary_stream(f"/{SERVICE}/Count")(b"1000")

    def first_then_cancel() -> bytes:
        first: bytes = next(responses)
        responses.cancel()
        return first

    assert await _in_thread(first_then_cancel) == b"0"
    with trio.fail_after(10):
        await service.stream_ended.wait()
    # Backpressure held the generator a response or two ahead of the
    # client; closing the RPC closed it there.
    assert service.produced < 5


async def test_a_client_stream_given_up_ends_the_service_quietly(
    served: tuple[grpc.Channel, Echo], caplog: pytest.LogCaptureFixture
) -> None:
    channel, service = served
    more = threading.Event()

    def requests() -> Iterator[bytes]:
        yield b"1"
        more.wait(30)  # the client never finishes its stream

    def start_then_cancel() -> None:
        call = channel.stream_unary(f"/{SERVICE}/Sum").future(requests())
        time.sleep(0.2)  # the service is waiting for the second request
        call.cancel()

    await _in_thread(start_then_cancel)
    with trio.fail_after(10):
        await service.sum_ended.wait()
    more.set()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_deadline_cancels_a_unary_call(served: tuple[grpc.Channel, Echo]) -> None:
    channel, service = served
    code, _ = await _status(_unary(channel, "Double"), b"7", timeout=0.2)
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    with trio.fail_after(10):
        await service.sleeper_ended.wait()


async def test_one_log_line_per_rpc_without_metadata(
    served: tuple[grpc.Channel, Echo], caplog: pytest.LogCaptureFixture
) -> None:
    channel, _ = served
    caplog.set_level(logging.INFO, logger="ckfs.services.bridge")
    metadata = (("authorization", "Bearer s3cret"),)
    await _in_thread(_unary(channel, "Double"), b"1", metadata=metadata)
    await _status(_unary(channel, "Double"), b"-1", metadata=metadata)
    lines = [r.getMessage() for r in caplog.records]
    assert [line.rsplit(" ", 1)[0] for line in lines] == [
        f"/{SERVICE}/Double OK",
        f"/{SERVICE}/Double NOT_FOUND",
    ]
    assert not any("s3cret" in line for line in lines)


def test_generated_code_without_a_method_table_is_refused() -> None:
    from ckfs.services.bridge import generated_handlers

    def old_style(servicer: Any, server: Any) -> None:
        server.add_generic_rpc_handlers(())

    with pytest.raises(TypeError):
        generated_handlers(old_style)
