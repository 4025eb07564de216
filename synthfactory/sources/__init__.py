"""Real-data source plug-ins: each module in this package registers one source."""

from synthfactory.sources.base import SOURCES, Origin, Record, Source, SourceError, SourceParams, build_source

__all__ = ["SOURCES", "Origin", "Record", "Source", "SourceError", "SourceParams", "build_source"]
