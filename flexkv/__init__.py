"""The import path vLLM's in-tree ``FlexKVConnectorV1`` loads, served by this project's connector.

Only ``flexkv.integration.vllm.vllm_v1_adapter`` lives here. Tencent's FlexKV
installs a package of the same name: install one or the other.
"""
