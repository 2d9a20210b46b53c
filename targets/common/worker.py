"""The generation worker behind the HTTP server: one thread owns the engine.

Engines are not thread-safe, so every request becomes a `Job` in a bounded
queue and a single worker thread runs them one at a time. The request's own
thread reads the job's text pieces as they are produced and writes them to
its client; when the client goes away it cancels the job, and the worker
stops generating at the next token.

Standard library only (plus the engine contract): this ships to devices.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

from edgeq_targets.common.engine import GenerationConfig

logger = logging.getLogger(__name__)

_DONE = object()  # end-of-job marker in Job.events


class QueueFull(Exception):
    """Every place in the queue is taken; the request should be retried."""


class ClientGone(Exception):
    """The client closed its connection; its job was cancelled."""


@dataclass
class JobResult:
    """What a finished job reports; times are time.perf_counter() values."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    finish_reason: str = "length"  # "stop" | "length" | "cancelled" | "error"
    started: float = 0.0  # the worker took the job (prefill starts)
    first_token: float = 0.0
    end: float = 0.0
    output_ids: list[int] = field(default_factory=list)  # sampled, without EOS


class Job:
    """One generation request: prompt ids in, text pieces out."""

    def __init__(self, ids: list[int], cfg: GenerationConfig, received: float):
        self.ids = ids
        self.cfg = cfg
        self.received = received  # when the HTTP request arrived
        self.events: queue.SimpleQueue = queue.SimpleQueue()
        self.cancelled = threading.Event()
        self.result = JobResult(prompt_tokens=len(ids))
        self.error: str | None = None

    def pieces(
        self, connected: Callable[[], bool], poll_s: float = 0.25
    ) -> Iterator[str]:
        """Yield text pieces until the job ends; `result` is final afterwards.

        The client is checked at least every `poll_s`, also while the job
        waits in the queue or in a long prefill: a client that left cancels
        the job and raises ClientGone.
        """
        checked = time.perf_counter()
        while True:
            try:
                event = self.events.get(timeout=poll_s)
            except queue.Empty:
                event = None
            if event is _DONE:
                return
            if time.perf_counter() - checked >= poll_s:
                checked = time.perf_counter()
                if not connected():
                    self.cancelled.set()
                    raise ClientGone
            if event is not None:
                yield event

    def text(self, connected: Callable[[], bool]) -> str:
        """The whole generated text (for non-streaming answers)."""
        return "".join(self.pieces(connected))


class StopFilter:
    """Cuts the output at the first stop string, across token boundaries.

    Text that could be the beginning of a stop string is held back until
    the next piece shows whether it is one, so no part of a stop string is
    ever sent (the engine's own stop check can only trim the last piece).
    """

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        """(text safe to send now, whether a stop string was reached)."""
        self.pending += piece
        if not self.stops:
            out, self.pending = self.pending, ""
            return out, False
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        keep = self._partial_stop_len()
        cut = len(self.pending) - keep
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        """The held-back text, once generation ended without a stop."""
        out, self.pending = self.pending, ""
        return out

    def _partial_stop_len(self) -> int:
        """Length of the longest tail of `pending` that starts a stop string."""
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.pending)), best, -1):
                if self.pending.endswith(s[:n]):
                    best = n
                    break
        return best


class Worker:
    """Runs jobs one at a time on a daemon thread that owns the engine."""

    def __init__(self, engine, queue_size: int = 8):
        self.engine = engine
        self.jobs: queue.Queue = queue.Queue(maxsize=max(1, queue_size))
        self.busy = False
        self.served = 0
        self.cancelled = 0
        self.last: JobResult | None = None
        self.last_cancelled: JobResult | None = None
        self.closed = False
        # The thread never exits: MLX aborts the process at exit when a
        # thread that ran MLX has ended without mx.clear_streams() (see
        # ml-explore/mlx#3126), and this module must not import mlx.
        self._thread = threading.Thread(target=self._loop, name="edgeq-worker")
        self._thread.daemon = True
        self._thread.start()

    def submit(self, job: Job) -> Job:
        """Queue `job`; QueueFull when every place is taken."""
        if self.closed:
            raise QueueFull("the server is shutting down")
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise QueueFull(
                f"{self.jobs.maxsize} requests are already waiting"
            ) from None
        return job

    def waiting(self) -> int:
        """Jobs queued behind the running one."""
        return self.jobs.qsize()

    def close(self) -> None:
        """Refuse new jobs and cancel the waiting ones."""
        self.closed = True
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                return
            job.error = "the server is shutting down"
            job.result.finish_reason = "error"
            job.events.put(_DONE)

    def _loop(self) -> None:
        while True:
            job = self.jobs.get()
            self.busy = True
            try:
                self._run(job)
            except Exception as e:  # an engine failure must not kill the worker
                logger.exception("generation failed")
                job.error = f"generation failed: {e}"
                job.result.finish_reason = "error"
            finally:
                self.busy = False
                self.last = job.result
                if job.result.finish_reason == "cancelled":
                    self.cancelled += 1
                    self.last_cancelled = job.result
                else:
                    self.served += 1
                job.events.put(_DONE)

    def _run(self, job: Job) -> None:
        res = job.result
        res.started = time.perf_counter()
        if job.cancelled.is_set():  # the client left while it was queued
            res.finish_reason = "cancelled"
            res.first_token = res.end = res.started
            return
        stops = StopFilter(job.cfg.stop)
        eos = self.engine.tokenizer.eos_ids
        # Stop strings are handled here (StopFilter), not by the engine.
        tokens = self.engine.generate(job.ids, replace(job.cfg, stop=[]))
        last_time = res.started
        try:
            for tok in tokens:
                last_time = tok.time
                if job.cancelled.is_set():
                    res.finish_reason = "cancelled"
                    break
                if not (tok.finish_reason == "stop" and tok.id in eos):
                    res.output_ids.append(tok.id)
                text, hit = stops.feed(tok.text)
                if text:
                    job.events.put(text)
                if hit:
                    res.finish_reason = "stop"
                    break
                if tok.finish_reason:
                    res.finish_reason = tok.finish_reason
                    tail = stops.flush()
                    if tail:
                        job.events.put(tail)
        finally:
            close = getattr(tokens, "close", None)
            if close:  # a generator: let it clean up now, not at GC
                close()
            self._copy_stats(res, last_time)

    def _copy_stats(self, res: JobResult, last_time: float) -> None:
        """Counts and times from the engine (its `end` is unset when the
        generation was cut short here)."""
        stats = self.engine.last_stats
        res.prompt_tokens = stats.prompt_tokens or res.prompt_tokens
        res.generated_tokens = stats.generated_tokens
        res.started = stats.start or res.started
        res.first_token = stats.first_token or last_time
        res.end = stats.end or last_time
