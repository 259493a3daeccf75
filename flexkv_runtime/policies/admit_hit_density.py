"""Admit a block only if its class is worth the slot of the block it would displace.

Works with the ``hit_density`` eviction policy of the same tier, which learns
per class (first-seen blocks by request size, blocks seen r times) how many
hits per unit of slot-time a block brings. At capacity, a block is admitted
only when its class's best density (at any age) reaches the density of the
current victim: a class not worth its slot is not stored at all, which is the
rule that maximises hits for a fixed amount of cache space. Refused blocks
still count as seen (and ``observe``d ones, past a refusal in their request),
so a prefix that keeps coming back climbs into a reuse class and is admitted,
and their returns count as hits of their class (the eviction policy learns from
them as from its own evictions).
With any other eviction policy in the tier it admits everything.
"""
from __future__ import annotations

from flexkv_runtime.policies.base import AdmissionPolicy, PolicyContext
from flexkv_runtime.policies.hit_density import partner_for


class HitDensityAdmission(AdmissionPolicy):
    name = "hit_density"

    def __init__(self) -> None:
        super().__init__()
        self._partner = None

    def bind(self, ctx: PolicyContext) -> None:
        super().bind(ctx)
        self._partner = partner_for(ctx)
        # the manager calls admit once per missed block: go straight to the partner
        self.__dict__.pop("admit", None)
        if self._partner is not None:
            self.admit = self._partner.worth_admitting

    def admit(self, key, block, request_tokens: int) -> bool:
        return True  # no hit_density eviction policy in this tier to ask

    def observe(self, key, block, request_tokens: int) -> None:
        if self._partner is not None:
            self._partner.sighted(key, block)
