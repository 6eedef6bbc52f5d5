"""Developer tools, not used by the runtime: random-weight checkpoints and GGUF files of any size
(tests, benchmarks, `mllama demo`) and the stage-by-stage comparison of tensor dumps."""
