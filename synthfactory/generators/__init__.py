"""Generator plug-ins: each module in this package registers one generator."""

from synthfactory.generators.base import (
    GENERATORS,
    Generator,
    GeneratorParams,
    PluginSpec,
    Rejection,
    Sample,
    SampleSlot,
    TransientGeneratorError,
)

__all__ = [
    "GENERATORS",
    "Generator",
    "GeneratorParams",
    "PluginSpec",
    "Rejection",
    "Sample",
    "SampleSlot",
    "TransientGeneratorError",
]
