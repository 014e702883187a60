"""On the vLLM server's PYTHONPATH (workers.vllm_server): two fixes to how vLLM's NIXL connector uses the CPU.

1. NIXL agents start without the UCX progress thread (with NIXL_NO_PROG_THREAD=1). NIXL's Python API
   starts that thread with a zero polling delay, so it busy-polls: an idle vLLM worker burned 50-65%
   of a core on this machine (~1% without it), and vLLM offers no setting for it. Transfers still
   progress, driven by vLLM's own calls.
2. The model thread stays on the worker's cores (with AGENTKV_VLLM_KEEP_CORES=1). On a CPU, the
   connector moves the thread that builds it (the one that then runs the forward passes) to the last
   core of each NUMA node, whatever cores the process was given: two vLLM workers pinned to cores 0
   and 1 both ran their model on core 1. Its topology is cut to the cores this thread may use.
"""

import os
import sys

if os.environ.get("NIXL_NO_PROG_THREAD") == "1":
    try:
        import nixl._api as _api

        _defaults = list(_api.nixl_agent_config.__init__.__defaults__)
        _defaults[0] = False  # enable_prog_thread
        _api.nixl_agent_config.__init__.__defaults__ = tuple(_defaults)
    except Exception as exc:  # never break the interpreter over an optimisation
        print(f"agentkv vllm_sitecustomize: NIXL progress thread left on: {exc}", file=sys.stderr)


def _keep_to_allowed_cores(platform: type) -> None:
    discover = platform.discover_numa_topology.__func__

    def discover_allowed(cls) -> list[list[int]]:
        allowed = os.sched_getaffinity(0)
        return [kept for group in discover(cls) if (kept := [c for c in group if c in allowed])]

    platform.discover_numa_topology = classmethod(discover_allowed)


class _PatchWhenImported:
    """A meta-path finder that lets `vllm.platforms.cpu` load as usual, then patches its platform
    (importing it here, at interpreter start, would import torch and vLLM into every process)."""

    MODULE = "vllm.platforms.cpu"

    def find_spec(self, name, path, target=None):
        if name != self.MODULE:
            return None
        import importlib.util

        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_patch(module) -> None:
            exec_module(module)
            try:
                _keep_to_allowed_cores(module.CpuPlatform)
            except Exception as exc:
                print(f"agentkv vllm_sitecustomize: vLLM may move its model thread off its cores: {exc}", file=sys.stderr)

        spec.loader.exec_module = exec_and_patch
        return spec


if os.environ.get("AGENTKV_VLLM_KEEP_CORES") == "1" and hasattr(os, "sched_getaffinity"):
    sys.meta_path.insert(0, _PatchWhenImported())
