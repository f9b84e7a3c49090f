"""One model, one worker thread: requests wait in a bounded queue and greedy ones are batched.

The model and its tokenizer are used by this thread only, so requests never interleave inside a
``generate`` call. Greedy (temperature 0), unstreamed requests with equal settings that wait
together are answered in one left-padded batch: greedy answers do not depend on their batch
(tests/test_generation_chat.py), while a sampled answer depends on its seed's random stream and a
streamed one needs a batch of its own, so those run alone. A full queue refuses at once instead of
letting waits grow without bound.
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


@dataclass
class Job:
    prompt: Prompt
    settings: GenerationSettings
    on_text: Callable[[str], None] | None = None  # streamed: called on the worker thread
    result: Future[Completion] = field(default_factory=Future)

    def batchable_with(self, other: Job) -> bool:
        alone = self.on_text is not None or other.on_text is not None or self.settings.temperature > 0
        return not alone and self.settings == other.settings


@dataclass
class QueueStats:
    answered: int = 0
    batches: int = 0
    largest_batch: int = 0


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
        self._thread = threading.Thread(target=self._run, name="lav2-generation", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """Answer what waits, then stop the worker."""
        with self._ready:
            self._closed = True
            self._ready.notify()
        if self._thread.is_alive():
            self._thread.join()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def submit(self, prompt: Prompt, settings: GenerationSettings,
               on_text: Callable[[str], None] | None = None) -> Future[Completion]:
        job = Job(prompt, settings, on_text)
        with self._ready:
            if self._closed:
                raise QueueFullError("the server is shutting down")
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
        try:
            if batch[0].on_text is not None:
                first = batch[0]
                found = [generate_streamed(self.model, self.tokenizer, first.prompt, first.settings,
                                           first.on_text)]
            else:
                settings = replace(batch[0].settings, batch_size=len(batch))
                prompts = [job.prompt for job in batch]
                found = generate_completions(self.model, self.tokenizer, prompts, settings)
        except Exception as err:  # one request's failure must not stop the worker
            log.exception("generation failed")
            for job in batch:
                job.result.set_exception(err)
            return
        for job, completion in zip(batch, found, strict=True):
            job.result.set_result(completion)
        self.stats.answered += len(batch)
        self.stats.batches += 1
        self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
