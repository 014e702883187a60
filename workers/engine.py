"""The engine: requests in, tokens out. Its heartbeat is `schedule() -> run() -> postprocess()`.

Single-threaded by design: the built-in engine (workers.builtin) drives it from one thread (EngineLoop).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from kvstore.hashing import block_hashes, hash_seed
from kvstore.wire import SamplingParams, TokenChunk
from workers.backend import InvalidRequest
from workers.detokenizer import Detokenizer
from workers.grammar import GrammarCompiler, apply_masks
from workers.kv_cache import KVCacheManager, blocks_for
from workers.loader import LoadedModel
from workers.model import PagedCausalLM
from workers.pool import BlockPool, KVLayout
from workers.runner import ModelRunner
from workers.sampler import sample
from workers.scheduler import Scheduler
from workers.sequence import Sequence


@dataclass
class EngineConfig:
    block_size: int = 16
    num_blocks: int | None = None  # default: derived from kv_cache_bytes
    kv_cache_bytes: int = 1 << 30
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 4096
    mixed_prefill_tokens: int = 512  # at most this many prompt tokens in a step with decodes (workers/scheduler.py)
    itl_slowdown: float = 1.5  # a step with prompt tokens costs at most this many decode-only steps
    short_prompt_tokens: int = 256  # a new sequence with at most this many uncached prompt tokens is computed whole


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


class Engine:
    def __init__(self, model: LoadedModel, config: EngineConfig | None = None):
        self.config = config = config or EngineConfig()
        self.loaded = model
        self.tokenizer = model.tokenizer
        self.paged_model = PagedCausalLM(model.hf_model)
        self.max_model_len = model.max_model_len
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
        self.scheduler = Scheduler(self.kv_cache, config.max_num_seqs, config.max_num_batched_tokens, config.mixed_prefill_tokens,
                                   config.itl_slowdown, config.short_prompt_tokens)
        self.runner = ModelRunner(self.paged_model, self.pool.kv, config.block_size)
        self.eos_token_ids = self._eos_ids()
        self.grammars = GrammarCompiler(self.tokenizer, self.paged_model.lm_head.out_features)
        self._seqs: dict[str, Sequence] = {}
        self.held: dict[str, list[int]] = {}  # finished hold_blocks requests' blocks: full ones, then the partial one
        self._pending: list[TokenChunk] = []  # chunks produced outside a step (adopted first tokens)

    # -- requests --------------------------------------------------------------------------
    def prompt_hashes(self, token_ids: list[int], hash_salt: str = "", given: list[int] | None = None) -> list[int]:
        """Hashes of the prompt's full blocks: the gateway's when it sent them, computed otherwise."""
        if given and len(given) == len(token_ids) // self.pool.block_size:
            return list(given)
        return block_hashes(token_ids, self.pool.block_size, hash_seed(self.loaded.fingerprint, hash_salt))

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling: SamplingParams | None = None,
        *,
        session_id: str | None = None,
        pin_ttl_s: float | None = None,
        hash_salt: str = "",
        block_hashes: list[int] | None = None,
        adopted: AdoptedKV | None = None,
        hold_blocks: bool = False,
    ) -> None:
        """Queue a request. `hold_blocks` keeps its blocks referenced after it finishes (a prefill
        node holds them in `held` until the decode node has read them)."""
        sampling = sampling or SamplingParams()
        try:
            self.validate(prompt_token_ids, sampling)
            if request_id in self._seqs:
                raise InvalidRequest(f"request id {request_id!r} is already running", code="duplicate_request_id")
            matcher = self.grammars.matcher(sampling.grammar) if sampling.grammar else None
            if matcher is not None and sampling.grammar_resume:  # a moved reply: the grammar picks up where it was
                if not matcher.consume_tokens(list(prompt_token_ids[-sampling.grammar_resume :])):
                    raise InvalidRequest("the reply so far does not match the grammar", code="invalid_grammar", param="grammar")
        except InvalidRequest:
            if adopted is not None:  # the adopted blocks were handed to us: do not leak them
                self.pool.release(adopted.block_ids)
            raise
        seq = Sequence(
            request_id=request_id,
            token_ids=list(prompt_token_ids),
            sampling=sampling,
            hash_seed=hash_seed(self.loaded.fingerprint, hash_salt),
            block_hashes=self.prompt_hashes(prompt_token_ids, hash_salt, block_hashes),
            session_id=session_id,
            pin_ttl_s=pin_ttl_s,
            hold_blocks=hold_blocks,
            detokenizer=Detokenizer(self.tokenizer, list(sampling.stop)),
            matcher=matcher,
        )
        self._seqs[request_id] = seq
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
        if not 0 <= sampling.grammar_resume < n:
            raise InvalidRequest(f"grammar_resume must be within the prompt, got {sampling.grammar_resume}", param="grammar_resume")
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
        if sampling.grammar:
            self.grammars.matcher(sampling.grammar)  # compiled once, cached by its text

    def abort(self, request_id: str) -> TokenChunk | None:
        """Stop a request now and free its blocks (client gone, timeout, shutdown)."""
        seq = self._seqs.get(request_id)
        return None if seq is None else self._finish(seq, "abort")

    def abort_all(self, error: str) -> list[TokenChunk]:
        """Abort every request (shutdown, or a failed step); each final chunk carries `error`."""
        chunks = []
        for request_id in list(self._seqs):
            chunk = self.abort(request_id)
            if chunk is not None:
                chunk.finish_reason, chunk.error = "error", error
                chunks.append(chunk)
        return chunks

    def has_work(self) -> bool:
        return self.scheduler.has_work() or bool(self._pending)

    def take_pending(self) -> list[TokenChunk]:
        """Chunks produced outside a step (an adopted prompt's first token), for sending now rather
        than after the next step: that step is a whole decode (or mixed) step of TTFT."""
        pending, self._pending = self._pending, []
        return pending

    # -- the step --------------------------------------------------------------------------
    def step(self) -> list[TokenChunk]:
        pending = self.take_pending()
        self.pool.expire_pins()
        batch = self.scheduler.schedule()
        if batch is None:
            return pending
        # Rows that sample this step (their prompt completes) and follow a grammar: their masks
        # depend only on tokens already sampled, so they are computed while the forward runs.
        sampled_rows = [r for r, (seq, qlen) in enumerate(zip(batch.seqs, batch.query_lens)) if seq.num_computed + qlen == len(seq)]
        constrained = [r for r in sampled_rows if batch.seqs[r].matcher is not None]
        masks = self.grammars.masks_async([batch.seqs[r].matcher for r in constrained]) if constrained else None
        start = time.perf_counter()
        chunks = self._postprocess(batch, self.runner.run(batch), sampled_rows, constrained, masks)
        self.scheduler.observe(batch, time.perf_counter() - start)  # sampling synchronizes a GPU: the time is real
        return pending + chunks

    def _postprocess(self, batch, logits: torch.Tensor, sampled_rows: list[int], constrained: list[int], masks) -> list[TokenChunk]:
        # Sequences in the middle of a long prompt advance without sampling.
        for seq, qlen in zip(batch.seqs, batch.query_lens):
            seq.num_computed += qlen
            self.kv_cache.commit(seq)
        if not sampled_rows:
            return []
        seqs = [batch.seqs[r] for r in sampled_rows]
        logits = logits[sampled_rows]
        if masks is not None:
            apply_masks(logits, [sampled_rows.index(r) for r in constrained], masks.result())
        tokens, logprobs = sample(logits, seqs)
        return [self._append(seq, tok, lp) for seq, tok, lp in zip(seqs, tokens, logprobs)]

    def _append(self, seq: Sequence, token: int, logprob: float) -> TokenChunk:
        seq.token_ids.append(token)
        params = seq.sampling
        text, hit_stop = seq.detokenizer.push(token)
        grammar_done = seq.matcher is not None and self._grammar_done(seq, token)
        reason = None
        if hit_stop or grammar_done or token in params.stop_token_ids or (token in self.eos_token_ids and not params.ignore_eos):
            reason = "stop"
        elif len(seq.output_ids) >= params.max_tokens or len(seq) >= self.max_model_len:
            reason = "length"
        if reason is None:
            return self._chunk(seq, [token], text, [logprob])
        if not hit_stop:
            text += seq.detokenizer.flush()
        final = self._finish(seq, reason)
        final.token_ids, final.text, final.logprobs = [token], text, [logprob]
        return final

    @staticmethod
    def _grammar_done(seq: Sequence, token: int) -> bool:
        """Advance the matcher; True once the grammar allows nothing more (or, defensively, rejected the token)."""
        matcher = seq.matcher
        if not matcher.consume_token(token):
            return True
        return matcher.is_stopped()

    def _finish(self, seq: Sequence, reason: str) -> TokenChunk:
        if reason != "abort" and seq.session_id and seq.pin_ttl_s:
            self.pool.pin(seq.session_id, self.kv_cache.full_blocks(seq), seq.pin_ttl_s)
        if reason != "abort" and seq.hold_blocks:
            self.held[seq.request_id], seq.block_table = seq.block_table, []
        self.scheduler.finish(seq)
        self._seqs.pop(seq.request_id, None)
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
            ids.update([eos] if isinstance(eos, int) else eos or [])
        return ids
