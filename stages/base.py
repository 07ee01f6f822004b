"""The stage contract: construct with config, `setup()` loads models once, `__call__(batch) -> batch`.

A batch is columnar (`dict[str, list]`, columns of `schemas.work.WORK_SCHEMA`). A stage only touches rows whose
status is `ok`; a row that breaks gets `status`/`stage`/`error` instead of raising, so one bad record never takes
down a batch. If the engine call for a whole batch raises, the rows are retried one by one so that the failure is
pinned on the record that causes it. The same object runs in a plain loop and inside a Ray Data actor.

`acall` is the same contract for an event loop: text stages (`concurrent`) keep several batches in flight on one
engine so that vLLM batches them continuously. A fatal engine error (`stages.engines.errors.is_engine_dead`) is
never turned into failed rows: it raises `EngineDead`, and whoever hosts the stage replaces the process.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from schemas.config import TextModelConfig
from schemas.reflection import cap_reason, capped_section, reflection_regex, think_regex
from schemas.work import FAILED, FILTERED, OK, Batch, json_update, stage_seed
from stages.engines.errors import EngineDead, is_engine_dead


class StageError(Exception):
    """Raised inside `process` for one row; becomes status `failed` (or `filtered`) with the message."""

    def __init__(self, message: str, status: str = FAILED) -> None:
        super().__init__(message)
        self.status = status


class Stage:
    """Base class of every generation stage."""

    name: str = "stage"

    def __init__(self, fault_rate: float = 0.0) -> None:
        # fault_rate > 0 fails that share of rows on purpose, by the rule of `_fault` (tests of failure isolation).
        self.fault_rate = fault_rate
        self._clock = _SharedClock()  # splits wall time between overlapping `acall`s

    def setup(self) -> None:
        """Load models. Called once per process/actor before the first batch."""

    @property
    def model_name(self) -> str | None:
        return None

    def process(self, batch: Batch, rows: list[int]) -> list[Any]:
        """Compute this stage's output for `rows` (indices of ok rows). Return one result per row: a value to
        store with `store`, or a StageError for that row."""
        raise NotImplementedError

    def store(self, batch: Batch, i: int, result: Any) -> None:
        """Write one row's result into the batch."""
        raise NotImplementedError

    #: Whether `acall` lets several batches share the engine at once (text stages: continuous batching). Stages
    #: without it take one batch at a time, in `__call__`.
    concurrent: bool = False

    def __call__(self, batch: Batch) -> Batch:
        rows = self._ok_rows(batch)
        if not rows:
            return batch
        start = time.perf_counter()
        results = self._process_isolated(batch, rows)
        self._finish(batch, rows, results, (time.perf_counter() - start) / len(rows))
        return batch

    async def acall(self, batch: Batch) -> Batch:
        """`__call__` for an event loop: other batches may be in flight on the same engine meanwhile. A row's
        timing is its share of the wall time (while k batches overlap, each is charged 1/k), so the stage-seconds
        of a build still add up to the time the engine was busy."""
        rows = self._ok_rows(batch)
        if not rows:
            return batch
        key = self._clock.enter()
        try:
            results = await self.aprocess(batch, rows)
        finally:
            seconds = self._clock.exit(key)
        self._finish(batch, rows, results, seconds / len(rows))
        return batch

    async def aprocess(self, batch: Batch, rows: list[int]) -> list[Any]:
        """`process` without blocking the event loop; by default `_process_isolated` in a worker thread."""
        import asyncio

        return await asyncio.to_thread(self._process_isolated, batch, rows)

    @staticmethod
    def _ok_rows(batch: Batch) -> list[int]:
        return [i for i in range(len(batch["id"])) if batch["status"][i] == OK]

    def _finish(self, batch: Batch, rows: list[int], results: list[Any], per_row: float) -> None:
        """Store each row's result or mark its failure; record timings and the model name."""
        for i, result in zip(rows, results, strict=True):
            if self.fault_rate and _fault(batch["id"][i], self.name, self.fault_rate):
                result = StageError(f"injected fault (fault_rate={self.fault_rate})")
            if isinstance(result, StageError):
                mark(batch, i, self.name, result.status, str(result))
            else:
                try:
                    self.store(batch, i, result)
                except StageError as exc:
                    mark(batch, i, self.name, exc.status, str(exc))
            batch["timings"][i] = json_update(batch["timings"][i], self.name, round(per_row, 6))
            if self.model_name:
                batch["models"][i] = json_update(batch["models"][i], self.name, self.model_name)

    def _process_isolated(self, batch: Batch, rows: list[int]) -> list[Any]:
        try:
            results = self.process(batch, rows)
        except Exception as exc:
            if is_engine_dead(exc):
                # Retrying rows on a dead engine would fail them all in no time: the process must be replaced.
                raise EngineDead(f"stage {self.name}: {type(exc).__name__}: {exc}") from exc
            if len(rows) == 1:
                return [StageError(f"{type(exc).__name__}: {exc}")]
            # Find the culprit: one call per row, each with its own error.
            return [self._process_isolated(batch, [i])[0] for i in rows]
        if len(results) != len(rows):
            raise RuntimeError(f"stage {self.name} returned {len(results)} results for {len(rows)} rows")
        return results


class _SharedClock:
    """Wall time split between overlapping calls on one event loop: while k calls are open, each accrues 1/k."""

    def __init__(self) -> None:
        self._open: dict[int, float] = {}
        self._last = time.perf_counter()
        self._next = 0

    def _advance(self) -> None:
        now = time.perf_counter()
        if self._open:
            share = (now - self._last) / len(self._open)
            for key in self._open:
                self._open[key] += share
        self._last = now

    def enter(self) -> int:
        self._advance()
        key, self._next = self._next, self._next + 1
        self._open[key] = 0.0
        return key

    def exit(self, key: int) -> float:
        self._advance()
        return self._open.pop(key)


class ModelStage(Stage):
    """A stage that owns a model engine: built from `cfg` in `setup()` unless an already set-up engine is given
    (engines may be shared between stages and builds in one process: tests, notebooks)."""

    def __init__(self, model: Any, fault_rate: float = 0.0, engine: Any = None) -> None:
        super().__init__(fault_rate)
        self.cfg = model
        self.engine: Any = engine

    def make_engine(self) -> Any:
        """Construct and set up the engine for `self.cfg` (imports of heavy libraries happen here)."""
        raise NotImplementedError

    def setup(self) -> None:
        if self.engine is None:
            self.engine = self.make_engine()

    @property
    def model_name(self) -> str | None:
        return self.cfg.model  # the configured name (Hub id or tiny:...), not a machine-specific path


@dataclass(frozen=True)
class Instruction:
    """What a text stage asks for under one strategy: the user text is `write(prompt, *texts, max_chars)` with the
    row's prompt, the row's values of the columns `texts` and the section budget; the images of the columns
    `images` are shown before it."""

    write: Callable[..., str]
    texts: tuple[str, ...] = ()
    images: tuple[str, ...] = ()


#: The structured-output regex of each template (`TextStage.template`), given the section budget.
_REGEXES: dict[str, Callable[[int], str]] = {"think": think_regex, "reflection": reflection_regex}


class TextStage(ModelStage):
    """A stage that writes text with an LLM/VLM (T1, T2); `strategy` picks what it looks at.

    A subclass says what it asks for per strategy (`instructions`), which template its text follows (`template`:
    the regex and the cap check) and where the checked text goes (`store`); the requests (one per row, the row's
    stage seed) and the checks every generated text gets (not empty; with structured outputs, no section cut off at
    the regex's cap) are here."""

    concurrent = True  # every TextEngine has `agenerate`; vLLM batches concurrent calls continuously

    #: The text this stage writes, for messages ("T1", "T2"), its template ("think" or "reflection", see
    #: `schemas.reflection`) and its request under each strategy.
    text_name: str = "text"
    template: str = "think"
    instructions: dict[str, Instruction] = {}

    def __init__(
        self, model: TextModelConfig, strategy: str = "forward", fault_rate: float = 0.0, engine: Any = None
    ) -> None:
        super().__init__(model, fault_rate, engine)
        if strategy not in self.instructions:
            raise ValueError(f"{self.name}: unknown strategy {strategy!r}; known: {', '.join(self.instructions)}")
        self.strategy = strategy

    def make_engine(self) -> Any:
        from stages.engines import open_text_engine

        return open_text_engine(self.cfg)

    def instruction(self, batch: Batch, i: int) -> tuple[str, list[bytes]]:
        """The user text and the images (encoded, shown before the text) of row `i`'s request."""
        spec = self.instructions[self.strategy]
        texts = (batch[column][i] for column in spec.texts)
        text = spec.write(batch["prompt"][i], *texts, self.cfg.max_section_chars)
        return text, [batch[column][i] for column in spec.images]

    def regex(self) -> str:
        """The structured-output regex of this stage's template, for the configured section budget."""
        return _REGEXES[self.template](self.cfg.max_section_chars)

    def requests(self, batch: Batch, rows: list[int]) -> list[Any]:
        """One `TextRequest` per row in `rows`: its instruction and images, the regex (with structured outputs) and
        the row's seed for this stage."""
        from stages.engines.text import TextRequest

        regex = self.regex() if self.cfg.structured else None
        requests = []
        for i in rows:
            text, images = self.instruction(batch, i)
            seed = stage_seed(batch["seed"][i], self.name)
            requests.append(TextRequest(prompt=text, images=images, regex=regex, seed=seed))
        return requests

    def generated_text(self, result: Any) -> str:
        """The engine's text for one row, stripped; an empty one fails the row."""
        text = (result or "").strip()
        if not text:
            raise StageError(f"empty generation for {self.text_name}")
        return text

    def check_cap(self, text: str) -> None:
        """Fail the row when a section of its (template-valid) text reached the regex's cap: only where the regex
        bounded the text (structured outputs) was a body at the cap cut off by the grammar."""
        if self.cfg.structured:
            capped = capped_section(text, self.cfg.max_section_chars, template=self.template)
            if capped is not None:
                raise StageError(cap_reason(capped, self.cfg.max_section_chars))

    def process(self, batch: Batch, rows: list[int]) -> list[Any]:
        return self.engine.generate(self.requests(batch, rows))

    async def aprocess(self, batch: Batch, rows: list[int]) -> list[Any]:
        """All rows go to the engine at once; a row the engine refused fails alone, a dead engine raises."""
        try:
            results = await self.engine.agenerate(self.requests(batch, rows))
        except Exception as exc:
            if is_engine_dead(exc):
                raise EngineDead(f"stage {self.name}: {type(exc).__name__}: {exc}") from exc
            return await super().aprocess(batch, rows)  # pin the failure on its row, as `__call__` does
        return [StageError(f"{type(r).__name__}: {r}") if isinstance(r, Exception) else r for r in results]


def mark(batch: Batch, i: int, stage: str, status: str, reason: str) -> None:
    """Set a row's outcome (filtered/failed) with the stage and reason."""
    assert status in (FILTERED, FAILED)
    batch["status"][i] = status
    batch["stage"][i] = stage
    batch["error"][i] = reason[:2000]


def _fault(row_id: str, stage: str, rate: float) -> bool:
    """The injected-fault rule (`fault_injection` in the build config; tests of failure isolation), a documented
    contract that tests may recompute on their own:

        a row fails on purpose at a stage exactly when random.Random(f"{row_id}:{stage}").random() < rate

    i.e. Python's Mersenne Twister seeded with the string "<row id>:<stage name>" (`Stage.name`, e.g. `think`,
    `draw_initial`), first draw. It depends on nothing else (not the batch, its order, the process or the run), so
    the same rows fail on every run with the same rate, and a larger rate fails a superset of the rows. The row
    gets status `failed`, the stage's name and the reason `injected fault (fault_rate=<rate>)`; only rows still ok
    when they reach the stage can fail there."""
    return random.Random(f"{row_id}:{stage}").random() < rate


def encode_image(image: Any, fmt: str, quality: int) -> bytes:
    """Encode a PIL image as PNG (lossless) or JPEG (quality >= 90), RGB."""
    import io

    buf = io.BytesIO()
    rgb = image.convert("RGB")
    if fmt == "png":
        rgb.save(buf, format="PNG")
    else:
        rgb.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def column(batch: Batch, name: str, rows: Sequence[int]) -> list[Any]:
    return [batch[name][i] for i in rows]
