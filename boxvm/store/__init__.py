"""SQLite metadata store: the only module that speaks SQL."""

from boxvm.store.db import SCHEMA_VERSION, BoxRecord, ImageRecord, SnapshotRecord, Store

__all__ = ["SCHEMA_VERSION", "BoxRecord", "ImageRecord", "SnapshotRecord", "Store"]
