"""Images: loading (every input kind), the reference preprocessing (canvas, resize, pad, normalize,
tiles), bit-exact with transformers."""
