"""Pool keys and the one fallback rule: which pool serves a request's pool key (pure).

Keys are paths ("vertical/category/..."). A request is served by its own pool if it exists,
else by its nearest existing parent ("ads/shoes/running" -> "ads/shoes" -> "ads"), else by the
global pool, which always exists. The decoder's registry, the pool service and the router's
affinity all ask this module, so the three never disagree about which pool a key means.

>>> resolve_pool_key("ads/shoes/running", {"ads", GLOBAL_POOL})
'ads'

A second tier sits under the pool key's: the task's pool (`task_pool_key`), holding the task's
answers of every pool key (what a generative recommendation says about any category looks
alike). It is never a fallback: a request drafts from both, the pool key's weighing more.
"""

from __future__ import annotations

from collections.abc import Container, Iterator

GLOBAL_POOL = "global"
POOL_KEY_SEPARATOR = "/"
# Task pools live under this reserved top-level key ("task/generative_rec").
TASK_POOL_ROOT = "task"


def fallback_chain(pool_key: str | None) -> Iterator[str]:
    """`pool_key`, then each of its parents, most specific first; the global pool is not in it
    (it is the fallback once the chain is exhausted).

    >>> list(fallback_chain("ads/shoes/running"))
    ['ads/shoes/running', 'ads/shoes', 'ads']
    >>> list(fallback_chain(""))
    []
    """
    key = pool_key or ""
    while key:
        yield key
        key = key.rpartition(POOL_KEY_SEPARATOR)[0]


def resolve_pool_key(pool_key: str | None, existing: Container[str], global_key: str = GLOBAL_POOL) -> str:
    """The key of the pool that serves `pool_key`: the first of its fallback chain in
    `existing`, else `global_key` (also for an empty or missing key).

    >>> resolve_pool_key("ads/books", {"ads/shoes", GLOBAL_POOL})
    'global'
    >>> resolve_pool_key(None, {"ads"})
    'global'
    """
    return next((key for key in fallback_chain(pool_key) if key in existing), global_key)


def task_pool_key(task: str | None) -> str | None:
    """The key of the task's pool (None: no task named).

    >>> task_pool_key("generative_rec"), task_pool_key("")
    ('task/generative_rec', None)
    """
    return f"{TASK_POOL_ROOT}{POOL_KEY_SEPARATOR}{task}" if task else None
