"""The LLM layer, for prompt generation and evaluation alike.

``backend`` (request, response, backend, validated spec), ``openai_http`` (the one OpenAI-compatible HTTP
client), ``local`` (transformers models, SmolLM2, the tiny LM, and the registry holding them), ``specs``
(``selma.v1.LlmBackend`` → spec), ``embedding`` (sentence embeddings), ``settings`` (``SELMA_LLM_*``) and
``metrics``.
"""
