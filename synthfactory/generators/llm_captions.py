"""Captions (or any short text) from a causal LM with SynCLR's in-context scheme.

Per slot, seeded by the slot: draw a concept source by weight and a concept from it,
a template (``concept -->``, ``concept, background -->``, ``concept, relation -->``),
the background or relation it needs, and `examples_per_prompt` in-context examples of
that template from the pool. The prompt is the examples, one per line, then the query
line; the completion's first line is the caption.

Sampling is per sample: temperature and top-p are applied as logits processors and
the token is drawn by adding Gumbel noise from the sample's own `torch.Generator` and
taking the argmax (exactly a draw from the truncated softmax). So a caption depends on
its seed, not on the batch it shared or on the global RNG, and a rerun on the same
hardware reproduces it; batching with left padding keeps the accelerator busy.
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, model_validator

from synthfactory import models
from synthfactory.generators.base import GENERATORS, Generator, GeneratorParams
from synthfactory.generators.inputs import read_lines, read_yaml_list
from synthfactory.samples import Rejection, Sample, SampleSlot

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


class LLMCaptionParams(GeneratorParams, models.ModelSettings):
    model: str = Field("meta-llama/Llama-2-7b-hf", description="hub id or local dir of a causal LM")
    concepts: tuple[ConceptSource, ...] = Field(min_length=1)
    backgrounds: tuple[str, ...] = ()
    backgrounds_file: str | None = None
    relations: tuple[str, ...] = RELATIONS
    templates: tuple[Template, ...] = SYNCLR_TEMPLATES
    examples: tuple[Example, ...] = ()
    examples_file: str | None = None
    examples_per_prompt: int = Field(3, ge=0, le=32)
    instruction: str = Field("", description="text put before the examples")
    temperature: float = Field(0.8, gt=0, le=10)
    top_p: float = Field(0.95, gt=0, le=1)
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


def _seeded_sampler(seeds: Sequence[int], temperature: float, top_p: float) -> Any:
    """Temperature + top-p, then per-row Gumbel noise: argmax of the result is a sample."""
    import torch
    from transformers import LogitsProcessor

    class SeededSampler(LogitsProcessor):
        def __init__(self) -> None:
            self.generators = [torch.Generator().manual_seed(seed) for seed in seeds]

        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
            scores = scores.float() / temperature
            ordered, order = scores.sort(dim=-1, descending=True)
            probs = ordered.softmax(dim=-1)
            drop_sorted = (probs.cumsum(dim=-1) - probs) > top_p  # keeps at least the top token
            drop = drop_sorted.scatter(-1, order, drop_sorted)
            uniform = torch.stack([torch.rand(scores.shape[-1], generator=g) for g in self.generators])
            gumbel = -torch.log(-torch.log(uniform.clamp(1e-20, 1.0 - 1e-7)))
            return scores.masked_fill(drop, float("-inf")) + gumbel.to(scores.device)

    return SeededSampler()


@GENERATORS.register("llm-captions")
class LLMCaptions(models.UsesModel, Generator):
    Params = LLMCaptionParams
    version = "1"
    code = ("synthfactory.models", "synthfactory.generators.inputs")
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
    }
    model_role = "caption"
    params: LLMCaptionParams

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

    def complete(self, prompts: Sequence[Prompt]) -> list[str]:
        """The LM's raw completions for a batch of prompts, each sampled with its slot's seed."""
        import torch
        from transformers import GenerationConfig, LogitsProcessorList

        p = self.params
        with models.explain_model_errors(self.model, self.device, "caption generation with"):
            lm, tokenizer = _load_lm(self.model.path, self.device, p.dtype)
            encoded = tokenizer([q.text for q in prompts], return_tensors="pt", padding=True).to(self.device)
            config = GenerationConfig(
                do_sample=False,  # the sampler below draws; argmax just reads its draw
                max_new_tokens=p.max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=lm.generation_config.eos_token_id,
                bos_token_id=lm.generation_config.bos_token_id,
            )
            sampler = _seeded_sampler([q.slot.seed for q in prompts], p.temperature, p.top_p)
            with torch.inference_mode():
                output = lm.generate(**encoded, generation_config=config, logits_processor=LogitsProcessorList([sampler]))
        return tokenizer.batch_decode(output[:, encoded["input_ids"].shape[1] :], skip_special_tokens=True)

    def generate(self, slots: Sequence[SampleSlot]) -> Iterator[Sample | Rejection]:
        for start in range(0, len(slots), self.params.batch_size):
            prompts = [self.prompt(slot) for slot in slots[start : start + self.params.batch_size]]
            for prompt, completion in zip(prompts, self.complete(prompts), strict=True):
                yield self._caption(prompt, completion)

    def _caption(self, prompt: Prompt, completion: str) -> Sample | Rejection:
        """First line of the completion, stripped; empty, echoed or copied ones are refused."""
        caption = completion.split("\n", 1)[0].strip()
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
        }
        files = {"txt": caption.encode(), "json": json.dumps(columns, sort_keys=True).encode()}
        return Sample(prompt.slot, caption, files, payload="txt", columns=columns)
