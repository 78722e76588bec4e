"""What tests (and ``benchmarks/``) share: tiny-model builders (``models``), references computed with plain
transformers hooks (``reference``), fakes for judges and clients (``fakes``), a local judge server
(``judge_server``), chat-template families, GGUF writers, the planted-persona training (``trained``) and shared
checks. No test module imports another."""
