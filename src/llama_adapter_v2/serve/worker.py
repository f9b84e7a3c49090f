"""One model, one worker thread: requests wait in a bounded queue and greedy ones are batched.

The model and its tokenizer are used by this thread only, so requests never interleave inside a
``generate`` call. Greedy (temperature 0), unstreamed requests with equal settings that wait
together are answered in one left-padded batch: greedy answers do not depend on their batch
(tests/test_generation_chat.py), while a sampled answer depends on its seed's random stream and a
streamed one needs a batch of its own, so those run alone; prompts with an image batch only with
prompts with an image (the model's visual prompts apply to a whole batch). A full queue refuses at
once instead of letting waits grow without bound. On shutdown, waiting requests are refused and the
running generation ends at its next token; a streamed request whose client has gone ends the same way.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Any

from llama_adapter_v2.infer.generation import (
    Completion,
    GenerationSettings,
    Prompt,
    generate_completions,
    generate_streamed,
)
from llama_adapter_v2.model.adapter import LlamaAdapterV2

log = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """As many requests wait as the server allows."""


class ShuttingDownError(QueueFullError):
    """The server is stopping: the request is refused or its generation was ended."""


@dataclass
class Job:
    prompt: Prompt
    settings: GenerationSettings
    on_text: Callable[[str], None] | None = None  # streamed: called on the worker thread
    cancel: threading.Event = field(default_factory=threading.Event)  # set: end generation, answer nothing
    result: Future[Completion] = field(default_factory=Future)

    def batchable_with(self, other: Job) -> bool:
        alone = self.on_text is not None or other.on_text is not None or self.settings.temperature > 0
        same_kind = (self.prompt.image is None) == (other.prompt.image is None)
        return not alone and same_kind and self.settings == other.settings


@dataclass
class QueueStats:
    answered: int = 0
    batches: int = 0
    largest_batch: int = 0
    cancelled: int = 0  # streams whose client left before the answer was complete


class GenerationQueue:
    """Submit from any thread; ``start`` the worker (jobs submitted before it wait and may batch)."""

    def __init__(self, model: LlamaAdapterV2, tokenizer: Any, *, max_batch: int = 8, max_waiting: int = 64
                 ) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_waiting = max_batch, max_waiting
        self.stats = QueueStats()
        self._waiting: deque[Job] = deque()
        self._ready = threading.Condition()
        self._closed = False
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lav2-generation", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self, timeout_s: float = 10.0) -> None:
        """Refuse what waits, end the running generation at its next token, and stop the worker."""
        with self._ready:
            self._closed = True
            self._stopping.set()
            refused, self._waiting = list(self._waiting), deque()
            self._ready.notify()
        for job in refused:
            if job.result.set_running_or_notify_cancel():
                job.result.set_exception(ShuttingDownError("the server is shutting down"))
        if self._thread.is_alive():
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                log.warning("the generation worker did not stop within %s s", timeout_s)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def submit(self, prompt: Prompt, settings: GenerationSettings,
               on_text: Callable[[str], None] | None = None, cancel: threading.Event | None = None
               ) -> Future[Completion]:
        """Queue one request; setting ``cancel`` ends its generation (a streamed request's client left)."""
        job = Job(prompt, settings, on_text, cancel or threading.Event())
        with self._ready:
            if self._closed:
                raise ShuttingDownError("the server is shutting down")
            if len(self._waiting) >= self.max_waiting:
                raise QueueFullError(f"{self.max_waiting} requests are already waiting")
            self._waiting.append(job)
            self._ready.notify()
        return job.result

    def _next_batch(self) -> list[Job] | None:
        with self._ready:
            while not self._waiting and not self._closed:
                self._ready.wait()
            if not self._waiting:
                return None
            first = self._waiting.popleft()
            batch = [first]
            for job in list(self._waiting):
                if len(batch) == self.max_batch:
                    break
                if first.batchable_with(job):
                    batch.append(job)
                    self._waiting.remove(job)
            return batch

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            live = [job for job in batch if job.result.set_running_or_notify_cancel()]
            if live:
                self._answer(live)

    def _answer(self, batch: list[Job]) -> None:
        def cancelled() -> bool:
            return self._stopping.is_set() or all(job.cancel.is_set() for job in batch)

        try:
            if batch[0].on_text is not None:
                first = batch[0]
                found = [generate_streamed(self.model, self.tokenizer, first.prompt, first.settings,
                                           first.on_text, cancelled=cancelled)]
            else:
                settings = replace(batch[0].settings, batch_size=len(batch))
                prompts = [job.prompt for job in batch]
                found = generate_completions(self.model, self.tokenizer, prompts, settings,
                                             cancelled=cancelled)
        except Exception as err:  # one request's failure must not stop the worker
            log.exception("generation failed")
            for job in batch:
                job.result.set_exception(err)
            return
        if self._stopping.is_set():
            for job in batch:
                job.result.set_exception(ShuttingDownError("the server shut down during generation"))
            return
        self.stats.cancelled += sum(job.cancel.is_set() for job in batch)
        for job, completion in zip(batch, found, strict=True):
            job.result.set_result(completion)
        self.stats.answered += len(batch)
        self.stats.batches += 1
        self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
