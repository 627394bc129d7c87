"""Disks: the qcow2 layer store (only this package touches qcow2 bytes)."""
