"""Errors about a shard output folder, shared by planning (`storage.plan`) and committing
(`storage.shards`)."""

from __future__ import annotations


class ShardStoreError(RuntimeError):
    """Base class of the errors this module raises about an output folder."""


class RunConflictError(ShardStoreError):
    """The output folder holds a different run (changed manifest, config or shard size)."""


class RunIncompleteError(ShardStoreError):
    """finalize_run was called while some shards are not committed."""


class ShardCorruptError(ShardStoreError):
    """A committed shard's files no longer match its stats file."""


class ShardValidationError(ShardStoreError, ValueError):
    """A worker's (pairs, status) tables break the shard contract; nothing was published."""
