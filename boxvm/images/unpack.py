"""``python -m boxvm.images.unpack LAYOUT DEST``: merge an image's layers into DEST.

A separate process so that an unprivileged user can run it under ``fakeroot``, which
records ownership, device nodes and setuid bits for ``mke2fs`` to replay.
"""

import sys
from pathlib import Path

from boxvm.errors import BoxvmError
from boxvm.images import oci


def main() -> None:
    layout, dest = Path(sys.argv[1]), Path(sys.argv[2])
    try:
        oci.unpack(oci.read_layout(layout, dest.parent), dest)
    except BoxvmError as exc:
        sys.stderr.write(f"{exc}\n")
        sys.exit(2)


if __name__ == "__main__":
    main()
