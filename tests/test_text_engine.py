"""Text engines on real tiny models: vLLM on the tiny Qwen2-VL, transformers on the tiny Qwen2.

No mocks: the outputs are meaningless (the tiny models are only trained to write one short sentence per template
section), but batching, ordering, images, seeds and the regex constraints are the real code paths. Structured
outputs must give template-valid text from ANY model, including one that never closes a section by itself
(`think_regex(8)` below: every plan runs into the cap).
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from pathlib import Path

import pytest
from fixtures_text import TEST_SECTION_CHARS

from pipeline.synthetic import draw
from schemas.config import TextModelConfig
from schemas.local import DONE_MARKER
from schemas.reflection import parse_reflection, reflection_regex, strip_think, think_regex
from stages.engines.text import TextRequest, TransformersTextEngine, VLLMTextEngine, make_text_engine
from stages.tiny_text import build_tiny_llm, build_tiny_vlm

pytestmark = pytest.mark.slow

RED = draw("red", "circle", 2, 64, 0)
BLUE = draw("blue", "square", 3, 64, 2)


def _weights_digest(path: Path) -> str:
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


def test_tiny_models_build_deterministically(tmp_path: Path, tiny_vlm_path: Path, tiny_llm_path: Path) -> None:
    vlm = build_tiny_vlm(tmp_path)
    llm = build_tiny_llm(tmp_path)
    assert _weights_digest(vlm) == _weights_digest(tiny_vlm_path)
    assert _weights_digest(llm) == _weights_digest(tiny_llm_path)
    for name in ("tokenizer.json", "config.json", "chat_template.jinja"):
        assert (vlm / name).read_bytes() == (tiny_vlm_path / name).read_bytes(), name
    # Idempotent: a completed build is reused untouched.
    mtime = (vlm / "model.safetensors").stat().st_mtime_ns
    assert build_tiny_vlm(tmp_path) == vlm
    assert (vlm / "model.safetensors").stat().st_mtime_ns == mtime
    assert (vlm / DONE_MARKER).exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dirs left behind


def test_tiny_tokenizer_keeps_the_template_text(tiny_vlm_path: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_vlm_path)
    text = "<think>\n### Final Comprehensive Prompt for the Improved Image:\n</think>"
    # <think> is ordinary text (not a special token), so detokenizing with skip_special_tokens keeps it.
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text
    for special in ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"):
        assert len(tok(special)["input_ids"]) == 1, special


def test_batch_mixes_text_and_images_in_order(vlm_engine: VLLMTextEngine) -> None:
    requests = [
        TextRequest("Describe a red circle.", seed=1),
        TextRequest("What is in this image?", images=[RED], seed=2),
        TextRequest("Compare the two images.", system="You are a critic.", images=[RED, BLUE], seed=3),
        TextRequest("Plan an image of two cats.", seed=4, regex=think_regex(TEST_SECTION_CHARS)),
        TextRequest("Reflect on the image.", images=[BLUE], seed=5, regex=reflection_regex(TEST_SECTION_CHARS)),
    ]
    outputs = vlm_engine.generate(requests)
    assert len(outputs) == len(requests)
    assert all(isinstance(o, str) and o for o in outputs)
    # Order: the constrained requests sit at known positions and only they follow their templates.
    strip_think(outputs[3])
    parse_reflection(outputs[4])
    assert vlm_engine.generate([]) == []


def test_think_regex_holds_for_every_output(vlm_engine: VLLMTextEngine) -> None:
    regex = think_regex(TEST_SECTION_CHARS)
    requests = [TextRequest(f"Plan image {i}.", regex=regex, seed=100 + i) for i in range(4)]
    requests.append(TextRequest("Plan from this sketch.", images=[RED], regex=regex, seed=200))
    for text in vlm_engine.generate(requests):
        assert re.fullmatch(regex, text), text
        assert "\ufffd" not in text  # every sampled byte sequence was valid UTF-8 (see schemas.reflection._NEVER)
        assert strip_think(text)


def test_reflection_regex_holds_for_every_output(vlm_engine: VLLMTextEngine) -> None:
    regex = reflection_regex(TEST_SECTION_CHARS)
    requests = [
        TextRequest("Reflect on the first image.", images=[RED], regex=regex, seed=300),
        TextRequest("Reflect on the second image.", images=[BLUE], regex=regex, seed=301),
        TextRequest("Compare I1 with the prompt.", images=[RED, BLUE], regex=regex, seed=302),
        TextRequest("Reflect without an image.", system="Be strict.", regex=regex, seed=303),
    ]
    for text in vlm_engine.generate(requests):
        assert re.fullmatch(regex, text), text
        assert "\ufffd" not in text
        reflection = parse_reflection(text)
        assert reflection.final_prompt.strip()


def test_seeds_make_sampling_reproducible(vlm_engine: VLLMTextEngine) -> None:
    regex = think_regex(TEST_SECTION_CHARS)
    same = [TextRequest("Plan an image.", images=[RED], regex=regex, seed=7) for _ in range(2)]
    other = [TextRequest("Plan an image.", images=[RED], regex=regex, seed=s) for s in (8, 9)]
    first = vlm_engine.generate(same + other)
    second = vlm_engine.generate(same + other)
    assert first == second  # same batch again: identical
    assert first[0] == first[1]  # same request and seed within a batch: identical
    assert len({first[0], first[2], first[3]}) == 3  # different seeds: different samples


def test_seeded_batch_larger_than_one_scheduler_step(vlm_engine: VLLMTextEngine) -> None:
    """Regression: on vLLM's CPU backend a seeded prompt split by chunked prefill crashed the engine ("CPU Generator
    does not use offset"). 48 prompts of ~250 tokens exceed one step's token budget; every request must finish."""
    filler = "plan the objects, colours, positions, lighting and style of the picture. " * 4
    requests = [TextRequest(prompt=f"{i}: {filler}", regex=think_regex(8), seed=i) for i in range(48)]
    outputs = vlm_engine.generate(requests)
    assert len(outputs) == 48
    assert all(re.fullmatch(think_regex(8), o) for o in outputs)


def test_image_limit_is_enforced(vlm_engine: VLLMTextEngine) -> None:
    with pytest.raises(ValueError, match="max_images"):
        vlm_engine.generate([TextRequest("too many", images=[RED, BLUE, RED])])


def test_concurrent_calls_share_the_engine_and_give_the_same_texts(vlm_engine: VLLMTextEngine) -> None:
    """Continuous batching: three 4-request calls in flight at once are batched together by vLLM and give exactly
    the texts they give one call at a time (per-request seeds)."""
    regex = think_regex(TEST_SECTION_CHARS)
    requests = [TextRequest(f"Plan image {i}.", regex=regex, seed=300 + i) for i in range(12)]
    requests[5] = TextRequest("Plan from this sketch.", images=[RED], regex=regex, seed=305)
    one_at_a_time = [t for k in range(0, 12, 4) for t in vlm_engine.generate(requests[k : k + 4])]

    async def together() -> list:
        return await asyncio.gather(*(vlm_engine.agenerate(requests[k : k + 4]) for k in range(0, 12, 4)))

    vlm_engine._loop.peak_in_flight = 0
    parts = asyncio.run(together())
    assert [t for part in parts for t in part] == one_at_a_time
    assert vlm_engine._loop.peak_in_flight > 4  # more than one call's requests were in the engine at once
    assert len(set(one_at_a_time)) == 12 and all(re.fullmatch(regex, t) for t in one_at_a_time)


def test_a_refused_request_fails_only_its_row(vlm_engine: VLLMTextEngine) -> None:
    too_long = "word " * 20_000  # over the engine's max_model_len: vLLM refuses it when it is added
    requests = [TextRequest("Plan image A.", seed=1), TextRequest(too_long, seed=2), TextRequest("Plan B.", seed=3)]
    results = asyncio.run(vlm_engine.agenerate(requests))
    assert isinstance(results[1], Exception) and "maximum context length" in str(results[1])
    assert [r for i, r in enumerate(results) if i != 1] == vlm_engine.generate([requests[0], requests[2]])
    with pytest.raises(Exception, match="maximum context length"):
        vlm_engine.generate(requests)  # the blocking call raises the row's error (stages then isolate it)
    assert vlm_engine.generate([requests[0]])  # and the engine goes on serving


def test_make_text_engine_picks_the_configured_engine(tiny_llm_path: Path) -> None:
    assert isinstance(make_text_engine(TextModelConfig(model=str(tiny_llm_path))), VLLMTextEngine)
    engine = make_text_engine(TextModelConfig(model=str(tiny_llm_path), engine="transformers"))
    assert isinstance(engine, TransformersTextEngine)
    assert engine.model_name == str(tiny_llm_path)


def test_transformers_fallback_on_tiny_llm(tiny_llm_path: Path) -> None:
    cfg = TextModelConfig(model=str(tiny_llm_path), engine="transformers", max_tokens=24, temperature=1.0)
    engine = make_text_engine(cfg)
    engine.setup()
    requests = [TextRequest("Plan an image.", seed=1), TextRequest("Plan another.", system="Be brief.", seed=2)]
    outputs = engine.generate(requests)
    assert len(outputs) == 2 and all(isinstance(o, str) and o.strip() for o in outputs)
    assert engine.generate(requests) == outputs  # seeded sampling
    with pytest.raises(ValueError, match="text-only"):
        engine.generate([TextRequest("look", images=[RED])])
    engine.close()


def test_transformers_fallback_on_tiny_vlm_with_images(tiny_vlm_path: Path) -> None:
    cfg = TextModelConfig(model=str(tiny_vlm_path), engine="transformers", max_tokens=16, temperature=1.0)
    engine = make_text_engine(cfg)
    engine.setup()
    outputs = engine.generate(
        [TextRequest("Text only.", seed=1), TextRequest("Two images.", images=[RED, BLUE], seed=2)]
    )
    assert len(outputs) == 2 and all(o.strip() for o in outputs)
    # The images reach the model: the inputs `generate` uses carry them, and the same question about another image
    # (or the same two images in the other order) gives another first-token distribution; the same request gives
    # the same one. (The tiny model's sampled texts are too alike to tell images apart by.)
    assert {"pixel_values", "image_grid_thw"} <= set(engine.inputs(TextRequest("Two images.", images=[RED, BLUE])))
    logits = {
        name: engine.next_token_logits(TextRequest("What is in this image?", images=images, seed=3))
        for name, images in [("red", [RED]), ("red again", [RED]), ("blue", [BLUE]), ("rb", [RED, BLUE]),
                             ("br", [BLUE, RED])]
    }  # fmt: skip
    assert logits["red"].equal(logits["red again"])
    assert (logits["red"] - logits["blue"]).abs().max() > 1e-2
    assert (logits["rb"] - logits["br"]).abs().max() > 1e-2
    engine.close()


def test_tensor_parallel_engine_inside_a_ray_actor(ray_session, tiny_vlm_config: TextModelConfig) -> None:
    """TP=2 on vLLM's CPU backend inside a Ray actor, placed as in production (docs/ENGINES.md): the engine core and
    its two tensor-parallel workers are child processes of the actor (vLLM's "mp" backend), not Ray tasks."""
    import psutil

    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "1", "VLLM_CPU_OMP_THREADS_BIND": "0|1"}  # one core per TP worker

    @ray_session.remote(num_cpus=0.5, runtime_env={"env_vars": env})
    class Engine:
        def run(self, cfg: TextModelConfig) -> tuple[list[str], list[str]]:
            engine = VLLMTextEngine(cfg)
            engine.setup()
            children = [" ".join(c.cmdline()).strip() for c in psutil.Process().children(recursive=True)]
            requests = [
                TextRequest(f"Plan image {i}.", regex=think_regex(TEST_SECTION_CHARS), seed=i) for i in range(4)
            ]
            texts = engine.generate(requests)
            engine.close()
            return children, texts

    cfg = tiny_vlm_config.model_copy(update={"tensor_parallel_size": 2})
    children, texts = ray_session.get(Engine.remote().run.remote(cfg), timeout=900)
    assert "VLLM::EngineCore" in children
    assert {"VLLM::Worker_TP0", "VLLM::Worker_TP1"} <= set(children), children
    assert len(texts) == 4 and all(re.fullmatch(think_regex(TEST_SECTION_CHARS), t) for t in texts), texts
