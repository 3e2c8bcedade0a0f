"""Hold the lease on an output (as a writer does) with a staging folder of its own, until killed.

``python tests/jobs/lease_holder.py OUTPUT``: prints ``held`` once it holds the lease; the test kills it.
"""

from __future__ import annotations

import os
import sys
import time


def main(output: str) -> None:
    from image_transfer.storage.fs import _LocalFs
    from image_transfer.storage.lease import hold

    fs, dest = _LocalFs(), os.path.abspath(output)
    with hold(fs, dest, command="score"):
        staging = fs.join(fs.parent(dest), f".{os.path.basename(dest)}.staging-killed")
        fs.mkdirs(staging)
        fs.write_text(fs.join(staging, "part-00000.parquet"), "half written")
        print("held", flush=True)
        while True:
            time.sleep(1)


if __name__ == "__main__":
    main(sys.argv[1])
