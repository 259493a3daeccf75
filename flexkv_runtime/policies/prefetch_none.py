"""No prefetch: slower tiers are read only when a request loads its prefix."""
from flexkv_runtime.policies.base import PrefetchPolicy


class NoPrefetch(PrefetchPolicy):
    name = "none"
