"""The error hierarchy, at its public path: ``from hf_dspark.errors import HfDSparkError``.

The classes are defined in :mod:`hf_dspark.models.dspark.errors`, because that file also ships as
remote code beside drafter checkpoints (the remote-code configuration and modeling files raise
the same classes). This module only gives them their documented import path.
"""

from hf_dspark.models.dspark.errors import *  # noqa: F401,F403
from hf_dspark.models.dspark.errors import __all__  # noqa: F401
