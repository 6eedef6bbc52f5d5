"""Text: the Llama 3 tokenizer built from the GGUF vocabulary, and the chat template."""
