"""Build tools: Debian packages (resolve, verified download, unpack), a root by mmdebstrap from a
local repository, ext4 and cpio images. The guest bundle and the built-in images are made with
them; they know nothing of boxes, guests or images."""
