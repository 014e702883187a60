"""On the vLLM server's PYTHONPATH (workers.vllm_server): NIXL agents start without the UCX progress thread.

NIXL's Python API starts that thread with a zero polling delay, so it busy-polls: an idle vLLM
worker burned 50-65% of a core on this machine (~1% without it), and vLLM offers no setting for it.
Transfers still progress, driven by vLLM's own calls. Applied only with NIXL_NO_PROG_THREAD=1.
"""

import os

if os.environ.get("NIXL_NO_PROG_THREAD") == "1":
    try:
        import nixl._api as _api

        _defaults = list(_api.nixl_agent_config.__init__.__defaults__)
        _defaults[0] = False  # enable_prog_thread
        _api.nixl_agent_config.__init__.__defaults__ = tuple(_defaults)
    except Exception as exc:  # never break the interpreter over an optimisation
        import sys

        print(f"agentkv vllm_sitecustomize: NIXL progress thread left on: {exc}", file=sys.stderr)
