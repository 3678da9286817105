"""The peer: llm-compressor's model_free_ptq, run by bench/run.py with the peer venv's python.

    /work/bench-data/peer-venv/bin/python bench/peer_ptq.py SRC DST [--workers 2]

Prints one JSON line: the time of the call itself (imports excluded), the import time, and the
llmcompressor version. The process wall time (start to exit) is measured by the caller.
Checked against llmcompressor 0.14: `from llmcompressor import model_free_ptq`,
`model_free_ptq(model_stub, save_directory, scheme=..., ignore=..., max_workers=..., device=...)`
where max_workers is a thread pool over input shards.
"""

from __future__ import annotations

import argparse
import json
import time

t_start = time.perf_counter()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--scheme", default="W4A16")
    a = p.parse_args()

    import importlib.metadata

    import torch  # noqa: F401
    from llmcompressor import model_free_ptq

    imported = time.perf_counter()
    model_free_ptq(
        a.src,
        a.dst,
        scheme=a.scheme,
        ignore=["lm_head", "re:.*embed_tokens"],
        max_workers=a.workers,
        device="cpu",
    )
    done = time.perf_counter()
    print(
        json.dumps(
            {
                "call_s": round(done - imported, 3),
                "import_s": round(imported - t_start, 3),
                "peer_version": importlib.metadata.version("llmcompressor"),
            }
        )
    )


if __name__ == "__main__":
    main()
