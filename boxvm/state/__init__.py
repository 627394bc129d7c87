"""The local backend's state services, composed by ``backends/local.LocalBackend``.

- ``context``: what every service shares (home, store, layer files, supervisor connections).
- ``boxes``: records, reconcile, crash recovery, the claim, staging of new box directories,
  create and remove.
- ``snapshots``: captures, snapshot create/list/restore/remove.
- ``clones``: clones of a box or of one of its snapshots.
- ``transfer``: export and import, and the archive manifest they write and read.
- ``memory``: suspend, and the memory state files of memory snapshots.

Imports go one way: context <- boxes <- memory <- snapshots <- clones, transfer.
"""
