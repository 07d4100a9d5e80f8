"""Beyond-prefix KV caching: typed prompt blocks, content hashes, RoPE re-rotation, assembly with
selective recomputation (CacheBlend / EPIC), and the per-model accuracy gate. No gRPC here."""
