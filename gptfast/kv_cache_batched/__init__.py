"""Drop-in for ``llms_from_scratch.kv_cache_batched``: Qwen3 for batches with a per-row KV cache.

* ``qwen3``: the model at per-row positions (:mod:`gptfast.models.qwen3_batched`);
* ``utils``: the per-row ``KVCache`` API over growing buffers (:class:`gptfast.generation.layer_cache.RowKVCache`);
* ``generate``: ``generate_text_simple`` on gptfast's static-cache decoder.
"""
