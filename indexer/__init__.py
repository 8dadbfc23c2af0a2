"""Shard indexes (faiss, or torch exact search) and their snapshots."""

try:
    import faiss  # noqa: F401
except ModuleNotFoundError as exc:  # the base dependencies leave the build to the `cpu`/`gpu` extra
    raise ModuleNotFoundError(
        "faiss is not installed: install feedret with the `cpu` extra (pip install 'feedret[cpu]'), "
        "or the `gpu` extra on CUDA machines",
        name="faiss",
    ) from exc
