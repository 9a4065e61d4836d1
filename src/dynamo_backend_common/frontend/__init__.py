"""The OpenAI-compatible frontend: model directories, pre/post-processing and (later) HTTP.

Submodules: :mod:`.model_dir` (Hugging Face model directories), :mod:`.openai_types` (request
and response shapes), :mod:`.preprocess` (chat template, tokenization, request mapping),
:mod:`.postprocess` (incremental detokenization, stop strings, finish reasons).
"""
