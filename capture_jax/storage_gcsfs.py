"""gcsfs's filesystem with the retry bounds of `storage` (`RETRIES`, `MAX_DELAY_S`).

fsspec imports this module the first time a `gs://` path is used (`storage` registers it for
the `gs` and `gcs` protocols), so that a command that never touches a bucket does not import
gcsfs (~0.4 s of every start).
"""

from __future__ import annotations

import gcsfs

from capture_jax import storage

storage._bound_gcsfs_retries()  # pylint: disable=protected-access

GCSFileSystem = gcsfs.GCSFileSystem
