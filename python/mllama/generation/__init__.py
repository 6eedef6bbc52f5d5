"""Generation: the sequence engine over the C context, sampling, the generation loop with its
per-request results, the OpenAI shapes, and multi-turn chat sessions."""
