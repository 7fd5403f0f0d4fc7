"""Shared test helpers: tiny Hugging Face models with real tokenizers, and engine adapters.

* ``hf_models.build_model_dir(family, directory)`` writes a small random
  Hugging Face checkpoint (config.json, model.safetensors, tokenizer files
  with a ChatML template) for one of ``hf_models.ALL_FAMILIES``.
* ``engine_models.load_test_model(directory)`` turns such a directory into
  the object ``engine_jax.engine.Engine`` takes (.name/.config/.params/.tokenizer).

Session fixtures built on these live in ``tests/conftest.py``.
"""
