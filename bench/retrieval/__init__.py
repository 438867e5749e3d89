"""Chunk retrieval: recall and queries/s of the FAISS and torch searchers, embedding throughput, the GPU scan."""
