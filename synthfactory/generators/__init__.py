"""Generator plug-ins: each module in this package registers one generator."""

from synthfactory.generators.base import GENERATORS, Generator, GeneratorParams, TransientGeneratorError
from synthfactory.plugins import PluginSpec
from synthfactory.samples import Rejection, Sample, SampleSlot

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
