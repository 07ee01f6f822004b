"""The optional VLM judge: a VLM that reads the prompt looks at I1 and I2 and says whether each satisfies it and
which is better; the configured rule (`JudgeModelConfig.rule`, table in `schemas.judge.judge_verdict`) keeps or
filters the trajectory. It runs after the CLIP verdict: a trajectory CLIP rejected never reaches it, so a kept
trajectory passed both.

One request per ok row: Image 1 (I1) then Image 2 (I2), then the instruction (`schemas.judge.judge_instruction`),
under the row's seed for this stage; with structured outputs (`cfg.structured`, vLLM) the answer follows
`judge_regex`, so it always parses. Outcomes:

- the answer, as `Judgement.to_json()`, goes to the row's `judge` column, for kept and rejected rows alike (the
  trajectory and the rejects/ line carry it);
- the verdict combines CLIP's and the judge's: kept exactly when both keep it. The judge's reason is appended to
  the CLIP verdict's: `verdict_reason` becomes `<CLIP's reason>; judge: <judge_verdict's reason>` (that reason
  names the rule, the answer and the judge's own sentence), and `verdict` becomes `reject` when the rule rejects;
- the rule rejects it: the row is `filtered` (permanent) with the reason `judge: <judge_verdict's reason>`;
- the answer does not parse (possible without structured outputs: the transformers engine, `structured: false`):
  the row is `failed` (retried on the next run) with the parse error and the start of the text;
- I1 or I2 missing or not an image: the row is `failed` alone, naming the image.

A reason that reached the regex's cap (`max_reason_chars`) was cut by the grammar, but the decision before it in
the JSON is complete, so the row is judged as usual: unlike T1/T2 (`TextStage.check_cap`), a reason is never
training data. Without structured outputs a longer reason is cut to `max_reason_chars` before it is stored.
"""

from __future__ import annotations

import io
from dataclasses import replace
from typing import Any

from schemas.config import JudgeModelConfig
from schemas.judge import JudgementError, judge_instruction, judge_regex, judge_verdict, parse_judgement
from schemas.work import FILTERED, Batch
from stages.base import Instruction, StageError, TextStage

#: Characters of an unparseable answer quoted in the failed row's reason.
QUOTED_CHARS = 120


def _image_problem(data: bytes | None) -> str | None:
    """Why `data` cannot be shown to the judge ("missing", "not an image: ..."), or None. Reads the header only:
    the engine decodes the image itself (and fails the row if the rest is broken)."""
    if not data:
        return "missing"
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)):
            return None
    except (UnidentifiedImageError, OSError) as exc:
        return f"not an image: {exc}"


class JudgeStage(TextStage):
    name = "judge"
    text_name = "judgement"
    template = "judge"
    cfg: JudgeModelConfig
    # The judge asks the same under both strategies: it compares the finished I1 and I2.
    instructions = {
        strategy: Instruction(judge_instruction, images=("i1", "i2")) for strategy in ("forward", "hindsight")
    }

    def __init__(
        self, model: JudgeModelConfig, strategy: str = "forward", fault_rate: float = 0.0, engine: Any = None
    ) -> None:
        if not isinstance(model, JudgeModelConfig):  # the rule and the reason budget live there
            raise TypeError(f"JudgeStage needs a JudgeModelConfig, got {type(model).__name__}")
        super().__init__(model, strategy, fault_rate, engine)

    def instruction(self, batch: Batch, i: int) -> tuple[str, list[bytes]]:
        """The judge's request of row `i` (its reason budget is `max_reason_chars`) and the images I1, I2."""
        return judge_instruction(batch["prompt"][i], self.cfg.max_reason_chars), [batch["i1"][i], batch["i2"][i]]

    def regex(self) -> str:
        return judge_regex(self.cfg.max_reason_chars)

    def _unshowable(self, batch: Batch, rows: list[int]) -> dict[int, StageError]:
        """The rows whose I1 or I2 cannot be shown, each with its failure; they never reach the engine."""
        failed = {}
        for i in rows:
            problems = [(name, _image_problem(batch[col][i])) for name, col in (("I1", "i1"), ("I2", "i2"))]
            said = "; ".join(f"{name} {problem}" for name, problem in problems if problem)
            if said:
                failed[i] = StageError(f"judge: {said}")
        return failed

    def process(self, batch: Batch, rows: list[int]) -> list[Any]:
        results: dict[int, Any] = self._unshowable(batch, rows)
        todo = [i for i in rows if i not in results]
        if todo:
            results.update(zip(todo, super().process(batch, todo), strict=True))
        return [results[i] for i in rows]

    async def aprocess(self, batch: Batch, rows: list[int]) -> list[Any]:
        results: dict[int, Any] = self._unshowable(batch, rows)
        todo = [i for i in rows if i not in results]
        if todo:
            results.update(zip(todo, await super().aprocess(batch, todo), strict=True))
        return [results[i] for i in rows]

    def store(self, batch: Batch, i: int, result: Any) -> None:
        text = self.generated_text(result)
        try:
            judgement = parse_judgement(text)
        except JudgementError as exc:
            raise StageError(f"judge: answer is not a judgement ({exc}): {text[:QUOTED_CHARS]!r}") from exc
        if len(judgement.reason) > self.cfg.max_reason_chars:  # only without the regex
            judgement = replace(judgement, reason=judgement.reason.strip()[: self.cfg.max_reason_chars])
        batch["judge"][i] = judgement.to_json()
        keep, reason = judge_verdict(judgement, self.cfg.rule)
        clip = batch["verdict_reason"][i]
        batch["verdict_reason"][i] = f"{clip}; judge: {reason}" if clip else f"judge: {reason}"
        batch["verdict"][i] = "accept" if keep else "reject"
        if not keep:
            raise StageError(f"judge: {reason}", status=FILTERED)
