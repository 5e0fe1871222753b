"""File formats: checkpoints and run folders, GGUF, tokenizers, the Hugging Face hub, other runtimes' shapes."""
