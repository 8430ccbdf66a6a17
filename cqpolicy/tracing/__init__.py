"""Trace storage: per-layer rows of instrumented sampling runs, as atomic parquet shards read back validated."""
from cqpolicy.tracing.store import (KEY_COLUMNS, KEY_TYPES, MANIFEST_NAME, SCHEMA_VERSION, RunInfo, TraceError,
                                    TraceReader, TraceWriter)

__all__ = ["SCHEMA_VERSION", "KEY_COLUMNS", "KEY_TYPES", "MANIFEST_NAME", "TraceError", "RunInfo", "TraceWriter",
           "TraceReader"]
