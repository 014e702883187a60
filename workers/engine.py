"""The engine: requests in, tokens out. Its heartbeat is `schedule() -> run() -> postprocess()`.

Single-threaded by design: the worker service owns one engine and calls it from one thread.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from kvstore.hashing import block_hashes, hash_seed
from workers.pool import BlockPool, KVLayout
from kvstore.wire import SamplingParams, TokenChunk
from workers.detokenizer import IncrementalDetokenizer
from workers.kv_cache import KVCacheManager, blocks_for
from workers.loader import LoadedModel
from workers.model import PagedCausalLM
from workers.runner import ModelRunner
from workers.sampler import Sampler
from workers.scheduler import Scheduler
from workers.sequence import Sequence


class InvalidRequest(ValueError):
    """The request cannot be run as given; `code` follows OpenAI's error codes where one exists."""

    def __init__(self, message: str, code: str = "invalid_request", param: str | None = None):
        super().__init__(message)
        self.code = code
        self.param = param


@dataclass
class EngineConfig:
    block_size: int = 16
    num_blocks: int | None = None  # default: derived from kv_cache_bytes
    kv_cache_bytes: int = 1 << 30
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 4096
    max_model_len: int | None = None  # default: the model's context length


@dataclass
class AdoptedKV:
    """KV for a prompt that another node computed and a transfer wrote into `block_ids`.

    The blocks cover the prompt's first `num_computed` tokens; `first_token` is the token the
    prefilling node sampled. The engine takes over the references the caller holds on the blocks.
    """

    block_ids: list[int]
    num_computed: int
    first_token: int
    first_logprob: float = 0.0
    local_blocks: int = 0  # leading blocks that were already in this pool (not transferred)


@dataclass
class GenerationResult:
    request_id: str
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0


class Engine:
    def __init__(self, model: LoadedModel, config: EngineConfig | None = None):
        self.config = config = config or EngineConfig()
        self.loaded = model
        self.tokenizer = model.tokenizer
        self.paged_model = PagedCausalLM(model.hf_model)
        self.max_model_len = config.max_model_len or model.max_model_len
        if config.block_size <= 0 or self.max_model_len % config.block_size:
            raise InvalidRequest(
                f"block size {config.block_size} must divide the context length {self.max_model_len}",
                code="invalid_block_size",
            )
        m = self.paged_model
        layout = KVLayout(m.num_layers, m.num_kv_heads, m.head_dim, model.dtype, model.device)
        per_block = m.num_layers * 2 * config.block_size * m.num_kv_heads * m.head_dim * layout.dtype.itemsize
        num_blocks = config.num_blocks or max(1, config.kv_cache_bytes // per_block)
        self.pool = BlockPool(num_blocks, config.block_size, layout)
        self.kv_cache = KVCacheManager(self.pool)
        self.scheduler = Scheduler(self.kv_cache, config.max_num_seqs, config.max_num_batched_tokens)
        self.runner = ModelRunner(self.paged_model, self.pool.kv, config.block_size)
        self.sampler = Sampler()
        self.eos_token_ids = self._eos_ids()
        self._seqs: dict[str, Sequence] = {}
        self._detok: dict[str, IncrementalDetokenizer] = {}
        self._seeds: dict[str, int] = {}
        self._held: dict[str, list[int]] = {}
        self._pending: list[TokenChunk] = []  # chunks produced outside a step (adopted first tokens)

    # -- requests --------------------------------------------------------------------------
    def hash_seed(self, salt: str = "") -> int:
        seed = self._seeds.get(salt)
        if seed is None:
            seed = self._seeds[salt] = hash_seed(self.loaded.fingerprint, salt)
        return seed

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling: SamplingParams | None = None,
        *,
        session_id: str | None = None,
        pin_ttl_s: float | None = None,
        hash_salt: str = "",
        adopted: AdoptedKV | None = None,
        hold_blocks: bool = False,
    ) -> None:
        """Queue a request. `hold_blocks` keeps its blocks referenced after it finishes (a prefill
        node holds them until the transfer to the decode node is done; see `release_held`)."""
        sampling = sampling or SamplingParams()
        self.validate(prompt_token_ids, sampling)
        if request_id in self._seqs:
            raise InvalidRequest(f"request id {request_id!r} is already running", code="duplicate_request_id")
        seq = Sequence(
            request_id=request_id,
            token_ids=list(prompt_token_ids),
            sampling=sampling,
            hash_seed=self.hash_seed(hash_salt),
            session_id=session_id,
            pin_ttl_s=pin_ttl_s,
            hold_blocks=hold_blocks,
        )
        self._seqs[request_id] = seq
        self._detok[request_id] = IncrementalDetokenizer(self.tokenizer, list(sampling.stop))
        if adopted is not None:
            seq.block_table = list(adopted.block_ids)
            seq.num_computed = adopted.num_computed
            seq.num_cached_tokens = adopted.local_blocks * self.pool.block_size
            seq.num_transferred_blocks = len(adopted.block_ids) - adopted.local_blocks
            seq.num_transferred_tokens = adopted.num_computed - seq.num_cached_tokens
            self.kv_cache.commit(seq)  # the adopted full blocks become cache hits here too
            chunk = self._append(seq, adopted.first_token, adopted.first_logprob)
            self._pending.append(chunk)
            if chunk.finished:
                return
        self.scheduler.add(seq)

    def validate(self, prompt_token_ids: list[int], sampling: SamplingParams) -> None:
        n = len(prompt_token_ids)
        if n == 0:
            raise InvalidRequest("the prompt is empty", param="prompt")
        if sampling.max_tokens <= 0:
            raise InvalidRequest(f"max_tokens must be at least 1, got {sampling.max_tokens}", param="max_tokens")
        if n >= self.max_model_len:
            raise InvalidRequest(
                f"the prompt has {n} tokens; this model's context is {self.max_model_len} tokens "
                "(prompt plus at least one generated token)",
                code="context_length_exceeded",
                param="messages",
            )
        if blocks_for(n + 1, self.pool.block_size) > self.pool.num_blocks:
            raise InvalidRequest(
                f"the prompt needs more KV blocks than this node has ({self.pool.num_blocks})",
                code="context_length_exceeded",
                param="messages",
            )
        if not 0 < sampling.top_p <= 1 or sampling.temperature < 0 or sampling.top_k < 0:
            raise InvalidRequest("temperature must be >= 0, top_p in (0, 1], top_k >= 0", param="temperature")
        vocab = self.paged_model.lm_head.out_features
        if min(prompt_token_ids) < 0 or max(prompt_token_ids) >= vocab:
            raise InvalidRequest(f"token ids must lie in [0, {vocab})", param="prompt")

    def abort(self, request_id: str) -> TokenChunk | None:
        """Stop a request now and free its blocks (client gone, timeout, shutdown)."""
        seq = self._seqs.get(request_id)
        if seq is None:
            return None
        return self._finish(seq, "abort")

    def abort_all(self, error: str) -> list[TokenChunk]:
        """Abort every request (shutdown, or a failed step); each final chunk carries `error`."""
        chunks = []
        for request_id in list(self._seqs):
            chunk = self.abort(request_id)
            if chunk is not None:
                chunk.finish_reason, chunk.error = "error", error
                chunks.append(chunk)
        return chunks

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    def has_work(self) -> bool:
        return self.scheduler.has_work() or bool(self._pending)

    # -- the step --------------------------------------------------------------------------
    def step(self) -> list[TokenChunk]:
        pending, self._pending = self._pending, []
        self.pool.expire_pins()
        batch = self.scheduler.schedule()
        if batch is None:
            return pending
        logits = self.runner.run(batch)
        return pending + self._postprocess(batch, logits)

    def _postprocess(self, batch, logits: torch.Tensor) -> list[TokenChunk]:
        # Sequences in the middle of a long prompt advance without sampling.
        sampled_rows = []
        for row, (seq, qlen) in enumerate(zip(batch.seqs, batch.query_lens)):
            seq.num_computed += qlen
            self.kv_cache.commit(seq)
            if seq.num_computed == len(seq):
                sampled_rows.append(row)
        if not sampled_rows:
            return []
        seqs = [batch.seqs[r] for r in sampled_rows]
        tokens, logprobs = self.sampler.sample(logits[sampled_rows], seqs)
        return [self._append(seq, tok, lp) for seq, tok, lp in zip(seqs, tokens, logprobs)]

    def _append(self, seq: Sequence, token: int, logprob: float) -> TokenChunk:
        seq.token_ids.append(token)
        seq.output_logprobs.append(logprob)
        params = seq.sampling
        detok = self._detok[seq.request_id]
        text, hit_stop = detok.push(token)
        reason = None
        if hit_stop or token in params.stop_token_ids or (token in self.eos_token_ids and not params.ignore_eos):
            reason = "stop"
        elif len(seq.output_ids) >= params.max_tokens or len(seq) >= self.max_model_len:
            reason = "length"
        if reason is None:
            return self._chunk(seq, [token], text, [logprob])
        if not hit_stop:
            text += detok.flush()
        final = self._finish(seq, reason)
        final.token_ids, final.text, final.logprobs = [token], text, [logprob]
        return final

    def _finish(self, seq: Sequence, reason: str) -> TokenChunk:
        if reason != "abort" and seq.session_id and seq.pin_ttl_s:
            self.pool.pin(seq.session_id, self.kv_cache.full_blocks(seq), seq.pin_ttl_s)
        if reason != "abort" and seq.hold_blocks:
            self._held[seq.request_id], seq.block_table = seq.block_table, []
        self.scheduler.finish(seq)
        seq.finish_reason = reason
        self._seqs.pop(seq.request_id, None)
        self._detok.pop(seq.request_id, None)
        self.sampler.forget(seq.request_id)
        chunk = self._chunk(seq, [], "", None)
        chunk.finished, chunk.finish_reason = True, reason
        return chunk

    def _chunk(self, seq: Sequence, tokens: list[int], text: str, logprobs: list[float] | None) -> TokenChunk:
        return TokenChunk(
            request_id=seq.request_id,
            token_ids=tokens,
            text=text,
            logprobs=logprobs if seq.sampling.logprobs else None,
            prompt_tokens=seq.num_prompt_tokens,
            cached_tokens=seq.num_cached_tokens,
            completion_tokens=len(seq.output_ids),
            transferred_tokens=seq.num_transferred_tokens,
            transferred_blocks=seq.num_transferred_blocks,
            transferred_bytes=seq.num_transferred_blocks * self.pool.bytes_per_block,
        )

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        for source in (self.loaded.hf_model.generation_config, self.tokenizer):
            eos = getattr(source, "eos_token_id", None)
            if isinstance(eos, int):
                ids.add(eos)
            elif eos:
                ids.update(eos)
        return ids

    # -- disaggregation hooks --------------------------------------------------------------
    def cached_prefix_blocks(self, token_ids: list[int], hash_salt: str = "") -> list[int]:
        """Pool blocks that hold the leading full blocks of `token_ids` (no reference taken)."""
        return self.pool.cached_prefix(block_hashes(token_ids, self.pool.block_size, self.hash_seed(hash_salt)))

    def held_blocks(self, request_id: str) -> list[int]:
        """Block table of a finished `hold_blocks` request: full blocks, then the partial one."""
        return self._held.get(request_id, [])

    def release_held(self, request_id: str) -> None:
        """The transfer is done (or timed out): drop the references a finished request kept."""
        blocks = self._held.pop(request_id, None)
        if blocks:
            self.pool.release(blocks)

    def release_blocks(self, block_ids: list[int]) -> None:
        """Give back reserved blocks that were never adopted (a transfer failed)."""
        self.pool.release(block_ids)

    def reserve_blocks(self, n: int) -> list[int]:
        """Blocks for a transfer to write into; hand them to `add_request(adopted=...)` or release them."""
        return self.pool.allocate(n)

    # -- offline helper (tests, benchmarks) ------------------------------------------------
    def generate(self, prompts: list[list[int]], sampling: SamplingParams | list[SamplingParams]) -> list[GenerationResult]:
        params = sampling if isinstance(sampling, list) else [sampling] * len(prompts)
        results = {}
        base = time.monotonic_ns()
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            rid = f"gen-{base}-{i}"
            results[rid] = GenerationResult(rid)
            self.add_request(rid, prompt, p)
        while self.has_work():
            for chunk in self.step():
                res = results[chunk.request_id]
                res.token_ids += chunk.token_ids
                res.text += chunk.text
                res.logprobs += chunk.logprobs or []
                res.prompt_tokens, res.cached_tokens = chunk.prompt_tokens, chunk.cached_tokens
                if chunk.finished:
                    res.finish_reason = chunk.finish_reason
        return list(results.values())
