"""The container image every component runs in, fixed when the pipeline is compiled.

KFP writes a component's image into the compiled pipeline, so it cannot be a run
parameter. Set ``IMGCLF_IMAGE`` before compiling to use your own build (tag or digest);
the default is the release image that matches this package's version.
"""

import os

DEFAULT_IMAGE = "ghcr.io/imgclf/imgclf:0.1.0"
IMAGE = os.environ.get("IMGCLF_IMAGE") or DEFAULT_IMAGE
