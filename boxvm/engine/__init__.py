"""QEMU engine: one supervised QEMU process per running box, driven over QMP."""
