"""This project's connector behind vLLM's in-tree ``FlexKVConnectorV1``.

vLLM (>= 0.18) ships ``FlexKVConnectorV1`` for Tencent's FlexKV: loaded by
name alone (``{"kv_connector": "FlexKVConnectorV1", "kv_role": "kv_both"}``),
it builds ``FlexKVConnectorV1Impl(vllm_config, role)`` from this module and
forwards fifteen hooks to it. The Impl is our ``FlexKVConnector`` with that
constructor, so those fifteen run the connector as is. The wrapper keeps two
things the connector needs:

- ``kv_cache_config`` (block geometry, layer names): the wrapper is given it
  but does not pass it on, and the scheduler process has no other way to it.
- every other hook, left at the base-class defaults: ``bind_connector_metadata``
  (the scheduler's per-step metadata), ``handle_preemptions``,
  ``build_connector_worker_meta`` (op completions, workers -> scheduler),
  ``has_pending_push_work``, ``on_new_request``, ``bind_kv_cache_manager``,
  ``reset_cache``... The forwarded fifteen cannot stand in for them: copies out
  of a preempted request's blocks must end before the forward that reuses the
  blocks, and no forwarded hook runs in time (without a synchronous load
  ``start_load_kv`` comes after the forward; ``wait_for_layer_load`` may come
  after the layer's KV write); an idle engine steps again, to ship queued
  copies, only when ``has_pending_push_work`` says so; and completions could
  only ride along in the stats vLLM logs.

So the Impl finds the wrapper that builds it, the ``self`` of its caller's
frame (vLLM calls it in the wrapper's ``__init__``, after the base class
stored ``kv_cache_config``; this works in the scheduler process too, where
``get_kv_transfer_group()`` has nothing), and binds, on that wrapper
instance, each public method of the connector interface the wrapper's class
leaves at the base-class default to the connector's own. The wrapper then
answers every hook as the connector does: metadata, completions and the
preemption fence take the same vLLM channels as under
``kv_connector_module_path``, and the same end-to-end tests run both ways. A
hook a later vLLM forwards stays forwarded. Properties and marker classes
cannot be rebound: the wrapper's ``requires_kv_delivery`` is true for
``kv_both`` (under async scheduling vLLM then recomputes, rather than
delivers, a preempted request's output in flight: the same tokens), and it is
not ``SupportsHMA`` (vLLM turns its hybrid allocator off; the connector
handles one full-attention group anyway).
"""
from __future__ import annotations

import inspect
import sys

from connector.flexkv_connector import FlexKVConnector
from vllm.config import VllmConfig
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1, KVConnectorRole


class FlexKVConnectorV1Impl(FlexKVConnector):
    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole) -> None:
        wrapper = sys._getframe(1).f_locals.get("self")
        if not isinstance(wrapper, KVConnectorBase_V1):
            raise TypeError("FlexKVConnectorV1Impl is built by vLLM's FlexKVConnectorV1 "
                            "(kv_connector='FlexKVConnectorV1'); on its own, load "
                            "connector.flexkv_connector.FlexKVConnector")
        super().__init__(vllm_config, role, wrapper._kv_cache_config)
        for name in unforwarded_hooks(type(wrapper)):
            setattr(wrapper, name, getattr(self, name))


def unforwarded_hooks(wrapper_cls: type) -> list[str]:
    """Public methods of the connector interface that ``wrapper_cls`` leaves at the base-class default."""
    return [name for name, member in vars(KVConnectorBase_V1).items()
            if inspect.isfunction(member) and not name.startswith("_") and getattr(wrapper_cls, name) is member]
