"""JAX's persistent compilation cache for runs (``config.compilation_cache_dir``, local or gs://).

A preempted or restarted pod job then loads its train step from the cache on every host
instead of compiling it again. :class:`CacheHits` tells whether a compile was a cache hit
(JAX's ``/jax/compilation_cache/cache_hits`` monitoring event).
"""

from __future__ import annotations

import os
from typing import Any

import jax
from jax.experimental.compilation_cache import compilation_cache

from fgtbt_jax import paths

HIT_EVENT = "/jax/compilation_cache/cache_hits"


def enable(directory: str | os.PathLike, flag: str = "config.compilation_cache_dir") -> str:
    """Points JAX's persistent compilation cache at ``directory``; returns it as a string.

    On gs:// the cache has no size limit (JAX's eviction takes a lock file, which an object
    store cannot hold).
    """
    path = str(paths.resolve(directory, flag))
    jax.config.update("jax_compilation_cache_dir", path)
    if paths.is_remote(path):
        jax.config.update("jax_compilation_cache_max_size", -1)
    compilation_cache.reset_cache()  # a cache opened earlier in this process is reopened here
    return path


class CacheHits:
    """Counts persistent-cache hits while active (``with CacheHits() as hits: …; hits.count``)."""

    def __init__(self) -> None:
        self.count = 0

    def _listen(self, event: str, **kwargs: Any) -> None:
        del kwargs
        if event == HIT_EVENT:
            self.count += 1

    def __enter__(self) -> CacheHits:
        jax.monitoring.register_event_listener(self._listen)
        return self

    def __exit__(self, *exc: object) -> None:
        jax.monitoring.unregister_event_listener(self._listen)
