"""A loopback OpenAI-compatible chat server for tests and benchmarks of the judge client.

It serves ``POST /v1/chat/completions`` on 127.0.0.1 (a free port chosen by the OS) from a daemon thread, answers
with whatever a ``responder(messages) -> str`` returns, with a deterministic ``usage`` (`token_usage`: words of the
prompt and of the answer) that it also records, and can wait a fixed latency per request, which is what the
throughput benchmark (:mod:`benchmarks.judge`, which imports it from here) needs. Test tooling stays out of the
installed package; the fault-injecting subclass the tests use lives in ``tests/judge_servers.py``.

Only the standard library is used: ``http.server.ThreadingHTTPServer`` speaking HTTP/1.1 with keep-alive (so a client's
connection pool is exercised as against a real server), one thread per connection. The server is bounded: use it as
a context manager (or call :meth:`LoopbackChatServer.stop`); stopping wakes every sleeping handler and closes every
open connection, so no thread outlives the ``with`` block by more than a moment.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

Messages = list[dict[str, Any]]
Responder = Callable[[Messages], str]

CHAT_COMPLETIONS_PATH = "/v1/chat/completions"


def default_responder(messages: Messages) -> str:
    """Answer every request with the same small JSON object."""
    return '{"score": 1}'


def prompt_text(messages: Messages) -> str:
    """All text of a chat request joined by newlines (string contents and ``text`` parts); images are skipped."""
    texts = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            texts.extend(
                part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text"
            )
    return "\n".join(texts)


def token_usage(messages: Messages, content: str) -> dict[str, int]:
    """The ``usage`` the loopback server reports: the words of the prompt's text (`prompt_text`) and of the answer."""
    prompt_tokens, completion_tokens = len(prompt_text(messages).split()), len(content.split())
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def chat_completion_body(content: str, model: str, usage: dict[str, int] | None = None) -> dict[str, Any]:
    """A minimal OpenAI ``chat.completion`` response object carrying ``content`` and ``usage`` (zeros by default)."""
    return {
        "id": "chatcmpl-loopback",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": usage or {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
    }


class ChatRequestHandler(BaseHTTPRequestHandler):
    """Reads one JSON chat request and hands it to the owning :class:`LoopbackChatServer`."""

    protocol_version = "HTTP/1.1"  # keep-alive, like vLLM / llama.cpp servers
    timeout = 30  # an idle keep-alive connection is dropped after this many seconds
    # Headers and body go out in two writes; with Nagle's algorithm on, the client's delayed ACK stalls every
    # response by ~40 ms — real servers set TCP_NODELAY too.
    disable_nagle_algorithm = True
    server: _HTTPServer
    messages: Messages = []  # those of the request being answered

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - signature of the base class
        pass  # tests run thousands of requests; access logs would drown pytest's output

    def setup(self) -> None:
        super().setup()
        self.server.owner._track_connection(self.connection, add=True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.owner._track_connection(self.connection, add=False)

    def do_POST(self) -> None:  # noqa: N802 - name fixed by BaseHTTPRequestHandler
        length = int(self.headers.get("Content-Length") or 0)
        raw_body = self.rfile.read(length)
        if self.path.rstrip("/") not in (CHAT_COMPLETIONS_PATH, "/chat/completions"):
            self.send_json(HTTPStatus.NOT_FOUND, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
            return
        try:
            body = json.loads(raw_body)
            messages = body["messages"]
        except (ValueError, KeyError, TypeError):
            self.send_json(HTTPStatus.BAD_REQUEST, {"error": {"message": "body is not a chat request", "type": "bad"}})
            return
        self.messages = messages
        self.server.owner._record_request(self.headers, body)
        self.server.owner.handle_chat(self, body, messages)

    def send_json(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        """Send ``payload`` as a complete JSON response with a correct Content-Length."""
        encoded = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(encoded)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(encoded)
        self.wfile.flush()

    def send_answer(self, content: str, *, record_usage: bool = True) -> None:
        """Send a 200 chat completion whose message content is ``content``, with its `token_usage`, which the server
        records (unless ``record_usage`` is False: an answer the client has stopped waiting for). Recorded before it
        is sent, so that a client that has its answer finds it in the server's sums."""
        usage = token_usage(self.messages, content)
        if record_usage:
            self.server.owner._record_usage(usage)
        self.send_json(HTTPStatus.OK, chat_completion_body(content, self.server.owner.model, usage))

    def send_truncated_answer(self, content: str) -> None:
        """Announce a full 200 answer but send only half of its body, then close the connection (no usage recorded:
        the client cannot read it)."""
        usage = token_usage(self.messages, content)
        encoded = json.dumps(chat_completion_body(content, self.server.owner.model, usage)).encode()
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(encoded)))
        self.end_headers()
        self.wfile.write(encoded[: len(encoded) // 2])
        self.wfile.flush()
        self.drop_connection()

    def drop_connection(self) -> None:
        """Close the connection at once, whatever has been sent so far."""
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # stop() closes the connections itself, so there is nothing to wait for
    request_queue_size = 256  # the default backlog of 5 drops connections when a client opens 16 at once
    owner: LoopbackChatServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that timed out or a connection closed by stop() is expected; anything else is a bug to show.
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


class LoopbackChatServer:
    """OpenAI-compatible chat server on 127.0.0.1 answering ``responder(messages)`` after ``latency_s`` seconds.

    Args:
        responder: messages → answer text (the assistant message content).
        latency_s: fixed delay before every answer, in seconds.
        model: model name echoed in the responses.

    Attributes:
        request_count: requests received on the chat route (thread-safe counter).
        authorization_headers: the ``Authorization`` header of every request, in arrival order.
        bodies: the decoded JSON body of every request, in arrival order.
        usages: the ``usage`` of every complete answer sent by `ChatRequestHandler.send_answer`, in order;
            ``prompt_tokens`` / ``completion_tokens`` are their sums.

    Use as ``with LoopbackChatServer(...) as server: client(base_url=server.base_url)``. A server stopped and
    started again listens on the same port, as a restarted judge server would (a judge that "goes down" mid-run).
    """

    def __init__(self, responder: Responder = default_responder, *, latency_s: float = 0.0, model: str = "loopback"):
        self.responder = responder
        self.latency_s = latency_s
        self.model = model
        self.request_count = 0
        self.authorization_headers: list[str | None] = []
        self.bodies: list[dict[str, Any]] = []
        self.usages: list[dict[str, int]] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._connections: set[socket.socket] = set()
        self._http_server: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._port = 0  # 0 until the first start: the OS picks a free port, kept for restarts

    @property
    def port(self) -> int:
        if self._http_server is None:
            raise RuntimeError("The loopback server is not running; use it as a context manager.")
        return self._http_server.server_address[1]

    @property
    def prompt_tokens(self) -> int:
        with self._lock:
            return sum(usage["prompt_tokens"] for usage in self.usages)

    @property
    def completion_tokens(self) -> int:
        with self._lock:
            return sum(usage["completion_tokens"] for usage in self.usages)

    @property
    def base_url(self) -> str:
        """The OpenAI ``base_url`` of this server (ends in ``/v1``)."""
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> LoopbackChatServer:
        """Bind a free port on 127.0.0.1 (the previous one on a restart) and serve from a daemon thread."""
        self._stopping.clear()
        self._http_server = _HTTPServer(("127.0.0.1", self._port), ChatRequestHandler)
        self._http_server.owner = self
        self._port = self._http_server.server_address[1]
        self._thread = threading.Thread(
            target=self._http_server.serve_forever, kwargs={"poll_interval": 0.05}, name="loopback-chat", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving: wake sleeping handlers, close every open connection, join the serving thread."""
        if self._http_server is None:
            return
        self._stopping.set()
        self._http_server.shutdown()
        self._http_server.server_close()
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            _close_quietly(connection)
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._http_server = None

    def __enter__(self) -> LoopbackChatServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def wait(self, seconds: float) -> bool:
        """Sleep ``seconds`` unless the server stops first; True if it is stopping."""
        return self._stopping.wait(seconds) if seconds > 0 else self._stopping.is_set()

    def handle_chat(self, handler: ChatRequestHandler, body: dict[str, Any], messages: Messages) -> None:
        """Answer one chat request; subclasses override this to inject faults or validate the request."""
        if self.wait(self.latency_s):
            return
        handler.send_answer(self.responder(messages))

    def _record_request(self, headers: Any, body: dict[str, Any]) -> None:
        with self._lock:
            self.request_count += 1
            self.authorization_headers.append(headers.get("Authorization"))
            self.bodies.append(body)

    def _record_usage(self, usage: dict[str, int]) -> None:
        with self._lock:
            self.usages.append(usage)

    def _track_connection(self, connection: socket.socket, *, add: bool) -> None:
        with self._lock:
            if add:
                self._connections.add(connection)
            else:
                self._connections.discard(connection)


def _close_quietly(connection: socket.socket) -> None:
    try:
        connection.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        connection.close()
    except OSError:
        pass


@contextlib.contextmanager
def loopback_server_process(
    *, latency_s: float = 0.0, answer: str = '{"score": 1}', responder: str | None = None
) -> Iterator[str]:
    """Run a :class:`LoopbackChatServer` answering ``answer`` in a child process; yield its base URL.

    ``responder``: ``"package.module:function"``, a responder the child imports and answers with instead of ``answer``.

    A server in its own process has its own GIL, so it does not steal CPU time from the client being measured, as a
    real judge server would not. The child exits when the context exits, or when this process dies (its stdin closes).
    """
    package_parent = str(Path(__file__).resolve().parents[1])
    environment = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [package_parent, os.environ.get("PYTHONPATH")])),
    }
    command = [sys.executable, "-m", "tests.loopback_server", "--latency", str(latency_s), "--answer", answer]
    if responder is not None:
        command += ["--responder", responder]
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=environment)
    try:
        line = process.stdout.readline() if process.stdout else ""
        if not line.startswith("port "):
            raise RuntimeError(f"The loopback server process did not start (exit code {process.poll()}).")
        yield f"http://127.0.0.1:{int(line.split()[1])}/v1"
    finally:
        if process.stdin:
            process.stdin.close()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve a loopback OpenAI-compatible chat server until stdin closes.")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before every answer")
    parser.add_argument("--answer", default='{"score": 1}', help="the assistant content of every answer")
    parser.add_argument("--responder", help="package.module:function answering each request instead of --answer")
    arguments = parser.parse_args()
    responder: Responder = lambda messages: arguments.answer  # noqa: E731
    if arguments.responder:
        import importlib

        module_name, _, function_name = arguments.responder.partition(":")
        responder = getattr(importlib.import_module(module_name), function_name)
    with LoopbackChatServer(responder, latency_s=arguments.latency) as server:
        print(f"port {server.port}", flush=True)
        sys.stdin.read()  # EOF when the parent closes our stdin or dies


if __name__ == "__main__":
    main()
