"""Prompts: tokenizers, chat templates, dataset records, the grain pipeline.

Modules (host only; none of them uses JAX):

  tokenizer.py     `Tokenizer` interface, SentencePiece, `train_sentencepiece`
  hf_tokenizer.py  HF `tokenizer.json` and Qwen2 vocab.json + merges.txt
  tokenizer_loader.py  `load_tokenizer`: a folder -> the right tokenizer
  templates.py     jinja chat templates rendered as transformers does
  records.py       dataset records, JSONL / Parquet readers, validation
  prompts.py       `DataConfig`, the grain pipeline, `PromptBatch`
  tasks.py         synthetic verifiable tasks (arithmetic, countdown) + CLI

Nothing heavy is imported here.
"""
