"""Captions (or any short text) from a causal LM with SynCLR's in-context scheme.

Per slot, seeded by the slot: draw a concept source by weight and a concept from it,
a template (``concept -->``, ``concept, background -->``, ``concept, relation -->``),
the background or relation it needs, and `examples_per_prompt` in-context examples of
that template from the pool. The prompt is the examples, one per line, then the query
line; the completion's first line is the caption.

Two backends. `transformers` (the default) runs the LM in the shard's process. Sampling
is per sample: temperature and top-p are applied as logits processors and the token is
drawn by adding Gumbel noise from the sample's own `torch.Generator` and taking the argmax
(exactly a draw from the truncated softmax). The generator lives on the model's device,
so the noise is drawn there (no per-step vocabulary-sized copy from the CPU); on CPU the
draws are the same as a CPU generator's. So a caption depends on its seed, not on the
batch it shared or on the global RNG, and a rerun on the same hardware reproduces it;
batching with left padding keeps the accelerator busy. `temperature: 0` is greedy
decoding (the argmax token at every step, top-p ignored, no noise drawn), as OpenAI and
transformers users expect.

`openai` sends the same prompts to an OpenAI-compatible server (vLLM, SGLang, TGI,
`transformers serve`, a hosted API), a shard's requests concurrently, each with the
sample's seed. Every answer is kept in the response cache beside the shard cache, so a
rerun, a resumed run or an append re-sends nothing already answered, and the release is
reproducible from the registry even where the server does not honour seeds. A request
that keeps failing rejects its sample with the reason. Tokens per sample (the server's
`usage`, or the tokenizer's count in process) go into the manifest; requests, retries,
back-offs and cache hits into the release's usage and cost.
"""

from __future__ import annotations

import json
import random
import string
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, model_validator

from synthfactory import models
from synthfactory.generators.base import GENERATORS, Generator, GeneratorParams
from synthfactory.generators.inputs import read_lines, read_yaml_list
from synthfactory.samples import Rejection, Sample, SampleSlot
from synthfactory.serving.params import EndpointParams
from synthfactory.usage import add_usage

#: SynCLR's positional words for the `concept, relation` template
RELATIONS = ("in front of", "behind", "next to", "on top of", "under", "above", "below", "beside", "inside", "near")
FIELDS = ("concept", "background", "relation")


class _Input(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ConceptSource(_Input):
    """A list of concept names (inline or one per line in `file`) and its sampling weight."""

    name: str = Field(min_length=1)
    weight: float = Field(gt=0)
    file: str | None = None
    concepts: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _load(self, info: ValidationInfo) -> "ConceptSource":
        if not self.concepts:
            if self.file is None:
                raise ValueError("give `concepts` or a `file` of concept names")
            object.__setattr__(self, "concepts", read_lines("file", self.file, info))
            if not self.concepts:
                raise ValueError(f"{self.file} holds no concept names")
        return self


class Template(_Input):
    """A prompt line: a format string over concept/background/relation, ending where the
    completion starts (SynCLR uses ``-->``)."""

    name: str = Field(min_length=1)
    format: str
    weight: float = Field(1.0, gt=0)

    @model_validator(mode="after")
    def _known_fields(self) -> "Template":
        unknown = sorted(self.fields() - set(FIELDS))
        if unknown:
            raise ValueError(f"template {self.name!r} uses {{{unknown[0]}}}; available: {', '.join(FIELDS)}")
        return self

    def fields(self) -> set[str]:
        return {field for _, field, _, _ in string.Formatter().parse(self.format) if field}

    def marker(self) -> str:
        """The text after the last field (``-->``): in a caption it means the LM echoed the format."""
        return self.format.rsplit("}", 1)[-1].strip()


class Example(_Input):
    """One in-context example: the template it illustrates, its fields and the caption."""

    template: str
    concept: str
    caption: str = Field(min_length=1)
    background: str | None = None
    relation: str | None = None


SYNCLR_TEMPLATES = (
    Template(name="concept", format="{concept} -->"),
    Template(name="background", format="{concept}, {background} -->"),
    Template(name="relation", format="{concept}, {relation} -->"),
)


class TransformersBackend(_Input):
    """Run the causal LM (params `model`, `device`, `dtype`) in the shard's process."""

    kind: Literal["transformers"] = "transformers"


class OpenAIBackend(EndpointParams):
    """Send the prompts to an OpenAI-compatible server; `model` is the name it serves."""

    kind: Literal["openai"]


Backend = Annotated[TransformersBackend | OpenAIBackend, Field(discriminator="kind")]
#: a served request's seed: the slot's seed folded to 31 bits, which every server accepts
SERVED_SEED_BITS = 31


class LLMCaptionParams(GeneratorParams, models.ModelSettings):
    model: str = Field("meta-llama/Llama-2-7b-hf", description="hub id or local dir of a causal LM")
    backend: Backend = Field(default_factory=TransformersBackend, description="where the LM runs")
    concepts: tuple[ConceptSource, ...] = Field(min_length=1)
    backgrounds: tuple[str, ...] = ()
    backgrounds_file: str | None = None
    relations: tuple[str, ...] = RELATIONS
    templates: tuple[Template, ...] = SYNCLR_TEMPLATES
    examples: tuple[Example, ...] = ()
    examples_file: str | None = None
    examples_per_prompt: int = Field(3, ge=0, le=32)
    instruction: str = Field("", description="text put before the examples")
    temperature: float = Field(0.8, ge=0, le=10, description="softmax temperature; 0: greedy (argmax "
                               "tokens, top_p ignored, the same caption for every seed given the prompt)")
    top_p: float = Field(0.95, gt=0, le=1, description="nucleus sampling: keep the smallest top set of "
                         "tokens whose probability reaches top_p; 1: the whole vocabulary")
    max_new_tokens: int = Field(64, ge=1, le=4096)
    batch_size: int = Field(32, ge=1, le=4096)

    @model_validator(mode="after")
    def _inputs(self, info: ValidationInfo) -> "LLMCaptionParams":
        if not self.backgrounds and self.backgrounds_file:
            object.__setattr__(self, "backgrounds", read_lines("backgrounds_file", self.backgrounds_file, info))
        if not self.examples and self.examples_file:
            examples = tuple(Example.model_validate(item) for item in read_yaml_list("examples_file", self.examples_file, info))
            object.__setattr__(self, "examples", examples)
        for template in self.templates:
            have = sum(example.template == template.name for example in self.examples)
            if have < self.examples_per_prompt:
                raise ValueError(
                    f"template {template.name!r} has {have} examples, needs examples_per_prompt={self.examples_per_prompt}"
                )
            if "background" in template.fields() and not self.backgrounds:
                raise ValueError(f"template {template.name!r} needs backgrounds (give backgrounds or backgrounds_file)")
            if "relation" in template.fields() and not self.relations:
                raise ValueError(f"template {template.name!r} needs relations")
        return self


@dataclass(frozen=True)
class Answer:
    """The LM's raw completion for one prompt (or why there is none), with its token counts."""

    text: str | None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    failure: str | None = None


@dataclass(frozen=True)
class Prompt:
    """What a slot asks the LM for, and the provenance recorded with its caption."""

    slot: SampleSlot
    text: str
    fields: dict[str, str | None]
    source: str
    template: str
    examples: tuple[str, ...]
    example_captions: frozenset[str]


@models.load_once
def _load_lm(path: Path, device: str, dtype: str) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"  # decoder-only: completions must start right after each prompt
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=models.torch_dtype(dtype, device)).to(device).eval()
    return model, tokenizer


def _seeded_sampler(seeds: Sequence[int], temperature: float, top_p: float, device: Any = "cpu") -> Any:
    """Temperature + top-p, then per-row Gumbel noise: argmax of the result is a sample.

    Each row's noise comes from its own `torch.Generator` on `device` (the model's), seeded
    with the row's seed, so a row's draws depend on its seed alone, never on the batch, and
    nothing vocabulary-sized crosses from the CPU each step. On CPU the draws equal those
    of `torch.rand(vocab, generator=torch.Generator().manual_seed(seed))`.
    """
    import torch
    from transformers import LogitsProcessor

    device = torch.device(device)

    class SeededSampler(LogitsProcessor):
        def __init__(self) -> None:
            self.generators = [torch.Generator(device=device).manual_seed(seed) for seed in seeds]

        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
            scores = scores.float() / temperature
            if top_p < 1.0:
                ordered, order = scores.sort(dim=-1, descending=True)
                probs = ordered.softmax(dim=-1)
                drop_sorted = (probs.cumsum(dim=-1) - probs) > top_p  # keeps at least the top token
                scores = scores.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
            uniform = torch.empty(scores.shape, dtype=torch.float32, device=device)
            for row, generator in zip(uniform, self.generators, strict=True):
                row.uniform_(generator=generator)  # one row per sample, from the sample's own stream
            gumbel = uniform.clamp_(1e-20, 1.0 - 1e-7).log_().neg_().log_().neg_()
            return scores + gumbel.to(scores.device)

    return SeededSampler()


@GENERATORS.register("llm-captions")
class LLMCaptions(models.UsesModel, Generator):
    Params = LLMCaptionParams
    # 2: token counts in each sample's json; 3: sampling noise drawn on the model's device (the same
    # captions on CPU, other ones on a GPU than 2 drew there), temperature 0 = greedy
    version = "3"
    # the client cuts completions at stop strings; the cache returns what it kept
    code = ("synthfactory.models", "synthfactory.generators.inputs", "synthfactory.serving.params",
            "synthfactory.serving.endpoint", "synthfactory.serving.cache", "synthfactory.usage")
    columns = {
        "concept": pa.string(),
        "concept_source": pa.string(),
        "template": pa.string(),
        "background": pa.string(),
        "relation": pa.string(),
        "examples": pa.list_(pa.string()),
        "caption_model": pa.string(),
        "caption_model_revision": pa.string(),
        "caption_seed": pa.int64(),
        "prompt_tokens": pa.int64(),
        "completion_tokens": pa.int64(),
    }
    model_role = "caption"
    params: LLMCaptionParams

    def __init__(self, params: LLMCaptionParams) -> None:
        super().__init__(params)
        # per thread: shards on a thread runner share this instance, each counts its own
        self._counts = threading.local()

    @property
    def _usage(self) -> list[dict[str, float]]:
        if not hasattr(self._counts, "usage"):
            self._counts.usage = []
        return self._counts.usage

    @property
    def served(self) -> OpenAIBackend | None:
        backend = self.params.backend
        return backend if isinstance(backend, OpenAIBackend) else None

    @cached_property
    def model(self) -> models.ResolvedModel:
        """A served model is named as the server serves it; no local weights are needed."""
        if self.served:
            return models.ResolvedModel(self.served.model, self.served.revision or "served (revision unknown)", Path())
        return models.resolve_model(self.params.model, self.params.revision, role=self.model_role)

    @cached_property
    def device(self) -> models.DeviceName:
        return "cpu" if self.served else models.select_device(self.params.device)

    def preflight(self) -> None:
        """A dead or misconfigured endpoint fails the run here, with the URL and what to check."""
        if not self.served:
            super().preflight()
            return
        from synthfactory.serving.endpoint import EndpointError, check_endpoint

        try:
            check_endpoint(self.served)
        except EndpointError as exc:
            raise models.ModelError(f"caption endpoint: {exc}") from None

    def take_usage(self) -> dict[str, float]:
        usage, self._counts.usage = add_usage(self._usage), []
        return usage

    @cached_property
    def _pools(self) -> dict[str, list[tuple[int, Example]]]:
        """(position in the pool, example) per template, built once rather than per prompt."""
        pools: dict[str, list[tuple[int, Example]]] = {t.name: [] for t in self.params.templates}
        for i, example in enumerate(self.params.examples):
            pools.setdefault(example.template, []).append((i, example))
        return pools

    def prompt(self, slot: SampleSlot) -> Prompt:
        """Everything random about a caption except the LM's tokens, drawn from the slot seed."""
        p = self.params
        rng = random.Random(slot.seed)
        source = rng.choices(p.concepts, weights=[s.weight for s in p.concepts])[0]
        template = rng.choices(p.templates, weights=[t.weight for t in p.templates])[0]
        used = template.fields()
        fields = {
            "concept": rng.choice(source.concepts),
            "background": rng.choice(p.backgrounds) if "background" in used else None,
            "relation": rng.choice(p.relations) if "relation" in used else None,
        }
        chosen = rng.sample(self._pools[template.name], p.examples_per_prompt)
        lines = [p.instruction] if p.instruction else []
        lines += [f"{template.format.format(**e.model_dump())} {e.caption}" for _, e in chosen]
        lines.append(template.format.format(**fields))
        return Prompt(
            slot=slot,
            text="\n".join(lines),
            fields=fields,
            source=source.name,
            template=template.name,
            examples=tuple(f"{template.name}-{i}" for i, _ in chosen),
            example_captions=frozenset(e.caption for _, e in chosen),
        )

    def complete(self, prompts: Sequence[Prompt]) -> list[Answer]:
        """The LM's raw completions for a batch of prompts, each sampled with its slot's seed."""
        return self._complete_served(prompts) if self.served else self._complete_here(prompts)

    def _complete_here(self, prompts: Sequence[Prompt]) -> list[Answer]:
        import torch
        from transformers import GenerationConfig, LogitsProcessorList

        p = self.params
        with models.explain_model_errors(self.model, self.device, "caption generation with"):
            lm, tokenizer = _load_lm(self.model.path, self.device, p.dtype)
            encoded = tokenizer([q.text for q in prompts], return_tensors="pt", padding=True).to(self.device)
            config = GenerationConfig(
                do_sample=False,  # greedy, or the sampler below draws and argmax just reads its draw
                max_new_tokens=p.max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=lm.generation_config.eos_token_id,
                bos_token_id=lm.generation_config.bos_token_id,
            )
            processors = LogitsProcessorList()
            if p.temperature > 0:  # 0: greedy, the argmax of the logits themselves
                seeds = [q.slot.seed for q in prompts]
                processors.append(_seeded_sampler(seeds, p.temperature, p.top_p, lm.device))
            with torch.inference_mode():
                output = lm.generate(**encoded, generation_config=config, logits_processor=processors)
        new_tokens = output[:, encoded["input_ids"].shape[1] :]
        texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        prompt_counts = encoded["attention_mask"].sum(dim=1).tolist()
        completion_counts = (new_tokens != tokenizer.pad_token_id).sum(dim=1).tolist()
        self._usage.append({"prompt_tokens": sum(prompt_counts), "completion_tokens": sum(completion_counts)})
        return [Answer(text, int(n_in), int(n_out)) for text, n_in, n_out in zip(texts, prompt_counts, completion_counts)]

    def _complete_served(self, prompts: Sequence[Prompt]) -> list[Answer]:
        from synthfactory.serving.cache import ResponseCache
        from synthfactory.serving.endpoint import CompletionRequest, EndpointStats, Failure, complete_batch

        p, stats = self.params, EndpointStats()
        requests = [CompletionRequest(q.text, q.slot.seed % 2**SERVED_SEED_BITS, p.max_new_tokens, p.temperature,
                                      p.top_p, stop=("\n",)) for q in prompts]  # the caption is the first line
        cache = ResponseCache(self.response_cache) if self.response_cache else None
        results = complete_batch(self.served, requests, cache=cache, stats=stats)
        self._usage.append(stats.as_dict())
        return [Answer(None, failure=f"caption endpoint: {r.reason}") if isinstance(r, Failure)
                else Answer(r.text, r.prompt_tokens, r.completion_tokens) for r in results]

    def generate(self, slots: Sequence[SampleSlot]) -> Iterator[Sample | Rejection]:
        # served: the shard's requests in one batch, under one adaptive limit and connection pool
        batch = max(1, len(slots)) if self.served else self.params.batch_size
        for start in range(0, len(slots), batch):
            prompts = [self.prompt(slot) for slot in slots[start : start + batch]]
            for prompt, answer in zip(prompts, self.complete(prompts), strict=True):
                yield self._caption(prompt, answer)

    def _caption(self, prompt: Prompt, answer: Answer) -> Sample | Rejection:
        """First line of the completion, stripped; empty, echoed or copied ones are refused."""
        if answer.text is None:
            return Rejection(prompt.slot, answer.failure or "no completion")
        caption = answer.text.split("\n", 1)[0].strip()
        if not caption:
            return Rejection(prompt.slot, "empty completion")
        if any(t.marker() and t.marker() in caption for t in self.params.templates):
            return Rejection(prompt.slot, "completion echoes the prompt format")
        if caption in prompt.example_captions:
            return Rejection(prompt.slot, "completion copies an in-context example")
        columns = {
            "concept": prompt.fields["concept"],
            "concept_source": prompt.source,
            "template": prompt.template,
            "background": prompt.fields["background"],
            "relation": prompt.fields["relation"],
            "examples": list(prompt.examples),
            "caption_model": self.model.id,
            "caption_model_revision": self.model.revision,
            "caption_seed": prompt.slot.seed,
            "prompt_tokens": answer.prompt_tokens,
            "completion_tokens": answer.completion_tokens,
        }
        files = {"txt": caption.encode(), "json": json.dumps(columns, sort_keys=True).encode()}
        return Sample(prompt.slot, caption, files, payload="txt", columns=columns)
