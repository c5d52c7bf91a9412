"""Calls from the service's event loop into a spawned worker process, over two pipes.

    service process (event loop)                 worker process (spawned)
    WorkerPipe.call(Method, *args) --request-->  serve_requests: Method(target, *args)
           awaits, with a deadline  <--reply---  the result or the exception, plus events

A request names a method of the worker's target class (a function pickled by its qualified name),
so both ends share one typed API instead of operation strings. Every call has a deadline: a
worker that does not answer in time is hung (SIGSTOP, a deadlock in native code) and is killed;
its pending calls, and every later one, raise `WorkerGone`. A worker that dies (a segfault, the
OOM killer) is found the same way, from the closed pipe.

The pipes carry pickles between this service and the processes it spawned, never data from the
network: requests are built here from validated HTTP bodies.
"""

from __future__ import annotations

import asyncio
import collections
import fcntl
import itertools
import logging
import multiprocessing as mp
import os
import pickle
import signal
import struct
import termios
import threading
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.reduction import ForkingPickler
from typing import Any, Callable, Protocol

log = logging.getLogger(__name__)

_PIPE_BYTES = 1 << 20  # a 32-step reply is ~240 KB: one write instead of four 64 KB round trips


class WorkerGone(RuntimeError):
    """The worker process exited, or was killed past its deadline; the message says which."""


class Served(Protocol):
    """What `serve_requests` needs of the object a worker process serves."""

    def inline(self, method: Callable, args: tuple) -> bool:
        """Cheap enough to run in the worker's main thread (else its pool)."""

    def idle(self) -> bool:
        """Do one piece of work while no request waits; False when there is none."""

    def drain_events(self) -> Any:
        """Events to send with the next reply (metrics), or None."""

    def close(self) -> None: ...


def _portable(e: BaseException) -> BaseException:
    """The exception itself when it survives pickling (our typed errors do), else a RuntimeError
    that names it (an env's own exception type may not)."""
    try:
        pickle.dumps(e)  # what the pipe does with it
        rebuild, args = e.__reduce__()[:2]
        rebuild(*args)  # what unpickling it will call on the other side (no bytes are loaded here)
        return e
    except Exception:  # noqa: BLE001 - any pickling failure means: send a stand-in
        return RuntimeError(f"{type(e).__name__}: {e}")


def serve_requests(rx, tx, target: Served, threads: int) -> None:
    """A worker process's loop: run the service's requests on `target` until it says stop or goes
    away. Cheap requests run right here, one after another (no thread hop); others in a pool."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the service's to handle; it stops us
    lock = threading.Lock()  # guards the reply pipe (pool threads reply too)
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="env-request")
    methods = type(target)

    def run(req_id: int, method: Callable, args: tuple) -> None:
        try:
            if getattr(methods, method.__name__, None) is not method:
                raise TypeError(f"{method!r} is not a method of {methods.__name__}")
            ok, result = True, method(target, *args)
        except Exception as e:  # noqa: BLE001 - every error goes back to the service, which maps it
            ok, result = False, _portable(e)
        with lock:
            try:
                tx.send((req_id, ok, result, target.drain_events()))
            except (pickle.PicklingError, TypeError, AttributeError, RecursionError) as e:  # an unpicklable result
                tx.send((req_id, False, RuntimeError(f"the reply could not be sent: {type(e).__name__}: {e}"), None))

    with lock:
        tx.send(("hello", os.getpid()))
    try:
        while True:
            # Idle between requests (the trainer is computing its next actions): do the target's
            # idle work one piece at a time, until a request arrives.
            while not rx.poll(0) and target.idle():
                pass
            try:
                msg = rx.recv()
            except (EOFError, OSError):  # the service went away
                break
            if msg is None:
                break
            req_id, method, args = msg
            if target.inline(method, args):
                run(req_id, method, args)
            else:
                pool.submit(run, req_id, method, args)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        target.close()


def _grow_pipe(conn) -> int:
    """Make a pipe hold 1 MB (Linux; elsewhere it keeps its size); its size in bytes."""
    try:
        fcntl.fcntl(conn.fileno(), 1031, _PIPE_BYTES)  # F_SETPIPE_SZ
        return fcntl.fcntl(conn.fileno(), 1032)  # F_GETPIPE_SZ
    except (OSError, AttributeError):
        return 0  # unknown: every request goes through the writer thread


def _unread(fd: int) -> int:
    """Bytes written into a pipe and not read yet."""
    try:
        return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]
    except OSError:
        return _PIPE_BYTES


class WorkerPipe:
    """A spawned process running `main(rx, tx, *args)` (which calls `serve_requests`), and calls
    into it. Requests are sent from the service's event loop, and replies read there too
    (`add_reader`: no reader thread to hop through). Build it on the loop that will use it."""

    _ids = itertools.count()

    def __init__(self, name: str, main: Callable, args: tuple, call_timeout_s: float,
                 on_events: Callable[[Any], None], on_exit: Callable[["WorkerPipe"], None]):
        ctx = mp.get_context("spawn")  # never fork a process that runs threads and an event loop
        self.name = name
        self.call_timeout_s = call_timeout_s
        req_rx, self._tx = ctx.Pipe(duplex=False)
        self._rx, rep_tx = ctx.Pipe(duplex=False)
        _grow_pipe(rep_tx)
        self._tx_size = _grow_pipe(self._tx)
        self._backlog: collections.deque[bytes] = collections.deque()
        self._writer_busy = False
        self._send_lock = threading.Lock()
        self.process = ctx.Process(target=main, name=name, daemon=True, args=(req_rx, rep_tx, *args))
        self.process.start()
        req_rx.close()
        rep_tx.close()
        self.dead: str | None = None
        self._closing = False
        self._pending: dict[int, asyncio.Future] = {}
        self._on_events = on_events
        self._on_exit = on_exit
        self._loop = asyncio.get_running_loop()
        self._ready = asyncio.Event()
        self._loop.add_reader(self._rx.fileno(), self._read)
        # uvloop (libuv) makes a watched fd non-blocking; `recv` must read a whole message once
        # its first bytes are there (the worker is writing the rest), so block.
        os.set_blocking(self._rx.fileno(), True)

    @property
    def started_ok(self) -> bool:
        return self._ready.is_set() and self.dead is None

    async def started(self, timeout: float = 120.0) -> None:
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
        except asyncio.TimeoutError:
            self.kill(f"{self.name} did not start within {timeout:.0f}s")
        if self.dead:
            raise WorkerGone(self.dead)

    def _read(self) -> None:
        """A reply is readable (the worker writes each in one go into a 1 MB pipe), or the worker is gone."""
        try:
            msg = self._rx.recv()
        except (EOFError, OSError):
            self._gone(f"{self.name} (pid {self.process.pid}) exited with code {self._exitcode()}")
            return
        if msg[0] == "hello":
            self._ready.set()
            return
        req_id, ok, payload, events = msg
        if events:
            self._on_events(events)
        fut = self._pending.pop(req_id, None)
        if fut is None or fut.done():
            return
        if ok:
            fut.set_result(payload)
        else:
            fut.set_exception(payload)

    def _exitcode(self) -> int | None:
        self.process.join(1)
        return self.process.exitcode

    def _gone(self, reason: str) -> None:
        """The worker is gone (or is being killed): fail what waits for it, once."""
        if self.dead is not None:
            return
        self.dead = reason
        self._loop.remove_reader(self._rx.fileno())
        self._ready.set()
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(WorkerGone(reason))
        if not self._closing:
            self._on_exit(self)

    def kill(self, reason: str) -> None:
        """Kill the worker (SIGKILL also ends a stopped process) and fail its calls with `reason`."""
        if self.dead is not None:
            return
        log.error("%s; killing it", reason)
        self.process.kill()
        self._gone(reason)

    async def call(self, method: Callable, *args: Any) -> Any:
        """`method(target, *args)` in the worker; its result, or its exception raised here."""
        if self.dead:
            raise WorkerGone(self.dead)
        req_id = next(self._ids)
        fut = self._loop.create_future()
        self._pending[req_id] = fut
        try:
            self._send(ForkingPickler.dumps((req_id, method, args)))
        except (OSError, ValueError) as e:
            self._pending.pop(req_id, None)
            raise WorkerGone(f"{self.name} is gone ({e})") from e
        try:
            return await asyncio.wait_for(fut, self.call_timeout_s)
        except asyncio.TimeoutError:
            self.kill(f"{self.name} (pid {self.process.pid}) did not answer within {self.call_timeout_s:g}s "
                      "(hung: stopped, or deadlocked in native code)")
            raise WorkerGone(self.dead) from None
        finally:
            self._pending.pop(req_id, None)

    def _send(self, buf: bytes) -> None:
        """Write a request without ever blocking the event loop: straight into the pipe when it
        surely has room, else through a writer thread. (Were the loop blocked on a full request
        pipe, it would stop reading replies; a worker blocked on a full reply pipe stops reading
        requests: both would wait forever.)"""
        with self._send_lock:
            # Room counted in whole pages, as the kernel fills them, with two to spare.
            room = self._tx_size - (_unread(self._tx.fileno()) // 4096 + 2) * 4096
            if not self._writer_busy and room >= len(buf) + 16:
                self._tx.send_bytes(buf)
                return
            self._backlog.append(buf)
            if not self._writer_busy:
                self._writer_busy = True
                threading.Thread(target=self._drain, name=f"{self.name}-writer", daemon=True).start()

    def _drain(self) -> None:
        while True:
            with self._send_lock:
                if not self._backlog:
                    self._writer_busy = False
                    return
                buf = self._backlog.popleft()
            try:
                self._tx.send_bytes(buf)  # may wait for the worker; the loop keeps reading replies
            except (OSError, ValueError):  # the worker is gone: its reader fails what is pending
                with self._send_lock:
                    self._backlog.clear()
                    self._writer_busy = False
                return

    async def close(self, timeout: float = 10.0) -> None:
        self._closing = True
        if self.dead is None:
            try:
                self._send(ForkingPickler.dumps(None))  # the worker closes its target and exits
            except (OSError, ValueError):
                pass
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.process.join, timeout)
        if self.process.is_alive():
            log.warning("%s did not stop in %.0fs; killing it", self.name, timeout)
            self.process.kill()
            await loop.run_in_executor(None, self.process.join, 5)
        self._gone(f"{self.name} was stopped")
        self._tx.close()
        self._rx.close()
