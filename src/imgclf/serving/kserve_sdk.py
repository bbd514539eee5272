"""The parts of the ``kserve`` SDK the server uses, imported without reading our argv.

``kserve.model_server`` parses ``sys.argv`` with its own argparse parser *at import time*
(``parse_known_args``): importing it from ``imgclf deploy --model ...`` would match
``--model`` against its ``--model_name`` by prefix, and a flag of ours with a value its
parser rejects would exit the process. The server passes every setting explicitly instead,
so the SDK sees an empty command line while it is imported.
"""

from __future__ import annotations

import sys

_argv = sys.argv
sys.argv = _argv[:1]
try:
    from kserve import Model, ModelServer
    from kserve import model_server as model_server_module
    from kserve.errors import InvalidInput
    from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse
finally:
    sys.argv = _argv

__all__ = [
    "InferOutput",
    "InferRequest",
    "InferResponse",
    "InvalidInput",
    "Model",
    "ModelServer",
    "model_server_module",
]
