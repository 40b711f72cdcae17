"""Drop-in for ``llms_from_scratch.kv_cache``: the book's KV-cache chapter code, module for module.

* ``gpt2``: the GPT-2 with ``use_cache`` / ``reset_kv_cache`` (:mod:`gptfast.models.gpt_kv_cache`);
* ``utils``: the per-layer ``KVCache`` API over the static cache (:mod:`gptfast.generation.layer_cache`);
* ``generate``: ``generate_text_simple`` / ``generate_text_simple_stream`` on gptfast's decoder.
* ``llama3``, ``qwen3``: Llama 3.2 and Qwen3 with a per-layer cache (:mod:`gptfast.models.llama3_cached`, ``qwen3_cached``).

gptfast's own static KV cache and decoding loop live in :mod:`gptfast.generation`.
"""
