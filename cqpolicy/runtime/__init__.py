"""The wrapper runtime (diffusers hooks on cache units) and its cache store."""
from cqpolicy.runtime.cache_store import CacheFormat, CacheStore
from cqpolicy.runtime.runtime import CacheRuntime, StepMismatchError, active_runtime, enable

__all__ = ["CacheFormat", "CacheStore", "CacheRuntime", "StepMismatchError", "active_runtime", "enable"]
