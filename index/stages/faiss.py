"""The `faiss` stage: the chunk embeddings -> a FAISS index (inner product on unit vectors).

IDX/retrieval/faiss.index   the FAISS index, ids = chunk ids
IDX/retrieval/faiss.json    {factory, metric, n, dim, exact, trained_on, nprobe, ef_search, rerank}

The factory string is `--faiss-factory` (any FAISS factory string) or chosen by size: exact (`Flat`) below
`EXACT_MAX` chunks, `IVF{nlist},SQ8` above, trained on a sample, its shortlist re-ranked exactly against the
float16 embeddings (FAISS's IndexRefine idea without a second copy of the vectors). Searching it is
`retrogram.index.search` (FaissSearcher and the torch searchers, opened by `open_searcher`).
"""

from __future__ import annotations

import json
import math
import os

import numpy as np

from ..build import AppendContext, Stage, StageContext, StageOutput
from ..errors import UserError
from ..manifest import write_json_atomic

FAISS_INDEX = "retrieval/faiss.index"
FAISS_JSON = "retrieval/faiss.json"
EXACT_MAX = 200_000
HNSW_MAX_BYTES = 4 << 30  # HNSW keeps float32 vectors in memory; above this IVF with 8-bit codes
ADD_BATCH = 65_536
DEFAULT_RERANK = 4       # shortlist = k * rerank for non-exact indexes


def import_faiss():
    try:
        import faiss
    except ImportError:
        raise UserError("the retriever needs FAISS: pip install faiss-cpu (or faiss-gpu-cu12, the [gpu] extra)") from None
    return faiss


def choose_factory(n: int, dim: int) -> str:
    """Exact below EXACT_MAX vectors; HNSW over the float32 vectors while they fit HNSW_MAX_BYTES (on the
    full real corpora, 328k chunks: recall@10 0.978 at 13.5x exact search's q/s, where IVF2048,SQ8 reached
    only 3.9x at 0.96); IVF with 8-bit scalar quantisation (re-ranked exactly) above."""
    if n < EXACT_MAX:
        return "Flat"
    if n * dim * 4 <= HNSW_MAX_BYTES:
        return "HNSW32,Flat"
    nlist = 1 << int(round(math.log2(4 * math.sqrt(n))))
    return f"IVF{nlist},SQ8"


def default_nprobe(nlist: int) -> int:
    return max(1, min(nlist, nlist // 32))


def make_index(factory: str, dim: int):
    faiss = import_faiss()
    try:
        return faiss.index_factory(int(dim), factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else "invalid"
        raise UserError(f"--faiss-factory {factory!r}: not a FAISS factory string for dim {dim} ({msg})") from None


def is_exact(index) -> bool:
    faiss = import_faiss()
    return isinstance(faiss.downcast_index(index), faiss.IndexFlat)


def training_sample(emb: np.ndarray, n_train: int, seed: int = 0) -> np.ndarray:
    n = len(emb)
    if n_train >= n:
        return np.asarray(emb, dtype=np.float32)
    ids = np.sort(np.random.default_rng(seed).choice(n, size=n_train, replace=False))
    return np.asarray(emb[ids], dtype=np.float32)


def train_and_add(index, emb: np.ndarray, task=None, max_train: int | None = None, start_id: int = 0) -> int:
    """Train `index` on a sample (when it needs training) and add every row of `emb` as ids start_id.. ."""
    faiss = import_faiss()
    trained_on = 0
    if not index.is_trained:
        ivf = faiss.try_extract_index_ivf(index)
        nlist = ivf.nlist if ivf is not None else 256
        n_train = min(len(emb), max_train or max(64 * nlist, 50_000))
        if ivf is not None and n_train < nlist:
            raise UserError(f"--faiss-factory: {nlist} IVF lists need at least {nlist} training vectors, "
                            f"the index has {len(emb)} chunks; use fewer lists or 'Flat'")
        sample = training_sample(emb, n_train)
        index.train(sample)
        trained_on = len(sample)
    for lo in range(0, len(emb), ADD_BATCH):
        x = np.ascontiguousarray(emb[lo: lo + ADD_BATCH], dtype=np.float32)
        index.add(x)
        if task is not None:
            task.advance(len(x))
    return trained_on


def run_faiss(ctx: StageContext) -> StageOutput:
    faiss = import_faiss()
    emb = ctx.index.embeddings
    n, dim = emb.shape
    factory = ctx.options.get("faiss_factory") or choose_factory(n, dim)
    index = make_index(factory, dim)
    task = ctx.track("faiss", total=n)
    trained_on = train_and_add(index, emb, task)
    out = ctx.tmp_dir / "retrieval"
    out.mkdir(parents=True, exist_ok=True)
    faiss.write_index(index, str(out / "faiss.index"))
    ivf = faiss.try_extract_index_ivf(index)
    meta = {"factory": factory, "metric": "inner_product", "n": int(index.ntotal), "dim": int(dim),
            "exact": is_exact(index), "trained_on": trained_on,
            "nprobe": default_nprobe(ivf.nlist) if ivf is not None else None,
            "ef_search": 64 if "HNSW" in factory else None,
            "rerank": 1 if is_exact(index) else DEFAULT_RERANK}
    write_json_atomic(out / "faiss.json", meta)
    return StageOutput(counts={"vectors": int(index.ntotal), "trained_on": trained_on})


def check_append_faiss(ctx: AppendContext) -> None:
    """--append adds to the FAISS index it has (an IVF index keeps its trained centroids)."""
    factory = ctx.options.get("faiss_factory")
    if factory and factory != ctx.record("faiss").params.get("faiss_factory"):
        raise UserError(f"--faiss-factory {factory}: --append adds to the existing FAISS index "
                        "and cannot change its factory")


def append_faiss(ctx: AppendContext) -> None:
    """The new chunks' embeddings added to faiss.index (rewritten whole under a temp name, then renamed)."""
    if ctx.vectors is None:
        return
    faiss = import_faiss()
    index_dir = ctx.index_dir
    index = faiss.read_index(str(index_dir / FAISS_INDEX))
    index.add(np.ascontiguousarray(ctx.vectors, dtype=np.float32))
    tmp = index_dir / (FAISS_INDEX + ".tmp")
    faiss.write_index(index, str(tmp))
    ctx.journal.backup(FAISS_INDEX)
    ctx.journal.backup(FAISS_JSON)
    os.replace(tmp, index_dir / FAISS_INDEX)
    meta = json.loads((index_dir / FAISS_JSON).read_text())
    meta["n"] = int(index.ntotal)
    write_json_atomic(index_dir / FAISS_JSON, meta)
    ctx.record("faiss").counts["vectors"] = int(index.ntotal)
    ctx.refresh("faiss", [FAISS_INDEX, FAISS_JSON])


FAISS = Stage("faiss", ("embeddings",), run_faiss, option_keys=("faiss_factory",),
              summary="embeddings -> FAISS index (exact when small, HNSW or IVF + re-ranking when large)",
              append=append_faiss, check_append=check_append_faiss, order=50)
