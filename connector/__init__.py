"""FlexKV inside vLLM.

``connector.flexkv_connector.FlexKVConnector`` is the KV connector (load it with
``kv_connector_module_path="connector.flexkv_connector"``);
``connector.cache_policy`` offers FlexKV eviction policies to vLLM's own CPU
offloading. Importing this package needs no vLLM; those modules do.
"""
