"""A model zoo: many clean and backdoored models of varied attacks and training recipes, to measure scanners and
defenses on models they were not tuned on. :func:`build_zoo` builds one from a :class:`ZooConfig`."""

from .build import build_zoo, summarise
from .config import ARCHITECTURES, FAMILIES, ZooConfig
from .members import build_member
from .sampler import sample

__all__ = ["ARCHITECTURES", "FAMILIES", "ZooConfig", "build_member", "build_zoo", "sample", "summarise"]
