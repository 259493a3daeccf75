"""Admit every block: the baseline every cache starts from."""
from flexkv_runtime.policies.base import AdmissionPolicy


class AdmitAlways(AdmissionPolicy):
    name = "always"
    admits_everything = True

    def admit(self, key, block, request_tokens: int) -> bool:
        return True
