"""BlockManager: the paged KV cache's bookkeeping (which blocks are free, whose they are, and
which full blocks can be reused by a later prompt); plain Python, no torch.

A sequence's keys/values live in fixed-size blocks listed in `seq.block_table`. Blocks are
reference-counted: a full block whose content (token ids + media content keys, chained to
the blocks before it) was computed once is found by its hash and shared, so the same image
and question asked twice, or a chat's growing history, skip the prefill of that prefix.
A freed block goes to the back of the free list but keeps its hash until it is handed out
again, so recently used prefixes survive while memory is not needed (LRU eviction).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from server.engine.sequence import Sequence

# The parent block's hash (the first block's: the request's cache_salt), token ids, media
# keys: compared in full on a hit, since a Python hash can collide and the whole chain must
# match, not just this block.
BlockContent = tuple[int | str | None, tuple[int, ...], tuple[str, ...]]


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None  # set once the block is full and computed
    content: BlockContent | None = None  # checked on a hash hit (hashes may collide)


def num_blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Insertion-ordered: the front is the least recently freed block (evicted first).
        self.free: dict[int, None] = dict.fromkeys(range(num_blocks))
        self.cached: dict[int, int] = {}  # block hash -> block id
        self.num_hit_tokens = 0  # prompt tokens served from the prefix cache (metrics)
        self.num_queried_tokens = 0  # prompt tokens looked up

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    # -- admission ---------------------------------------------------------------------------
    def allocate(self, seq: Sequence) -> bool:
        """Blocks for every token the sequence has (prompt, and outputs after a preemption);
        its computed tokens start after the reused prefix. False, and nothing changed, when
        the free blocks cannot hold them (reused blocks held by others cost nothing; reused
        blocks in the free list still take a free block)."""
        hits = self.prefix_hits(seq)  # one walk of the prompt's hash chain for both
        if not self._fit(seq, hits):
            return False
        for block_id in hits:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free[block_id]
            block.ref_count += 1
        fresh = num_blocks_for(seq.num_tokens, self.block_size) - len(hits)
        seq.block_table = hits + [self._take_free() for _ in range(fresh)]
        seq.block_hashes = [self.blocks[block_id].hash for block_id in hits]  # type: ignore[misc]
        seq.num_computed_tokens = len(hits) * self.block_size
        if not seq.is_admitted:
            seq.num_cached_tokens = seq.num_computed_tokens
            self.num_queried_tokens += seq.inputs.num_prompt_tokens
            self.num_hit_tokens += seq.num_computed_tokens
        return True

    def can_allocate(
        self, seq: Sequence, hits: list[int], freeing: Iterable[Sequence] = (), reserve: int = 0
    ) -> bool:
        """Whether allocate(seq) (its prefix_hits `hits`) would succeed once the `freeing`
        sequences' blocks were freed and `reserve` free blocks kept for others (nothing
        changed here)."""
        released = Counter(block_id for other in freeing for block_id in other.block_table)
        return self._fit(seq, hits, released, reserve)

    def _fit(
        self, seq: Sequence, hits: list[int], released: Counter[int] | None = None, reserve: int = 0
    ) -> bool:
        released = released or Counter()

        def held(block_id: int) -> bool:  # by a sequence that keeps it
            return self.blocks[block_id].ref_count - released[block_id] > 0

        freed = sum(1 for block_id in released if not held(block_id))
        needed = num_blocks_for(seq.num_tokens, self.block_size) - sum(map(held, hits))
        return needed <= self.num_free_blocks + freed - reserve

    def prefix_hits(self, seq: Sequence) -> list[int]:
        """Cached blocks that hold the sequence's leading full blocks. At least one token is
        always left to compute: its logits give the next token."""
        if not self.enable_prefix_caching or seq.sampling.prompt_logprobs is not None:
            return []  # prompt logprobs need the logits of every prompt position
        hits: list[int] = []
        parent: int | None = None
        for index in range((seq.num_tokens - 1) // self.block_size):
            content = self._content(seq, index, parent)
            parent = hash(content)
            block_id = self.cached.get(parent)
            if block_id is None or self.blocks[block_id].content != content:
                break
            hits.append(block_id)
        return hits

    def _take_free(self) -> int:
        block_id = next(iter(self.free))
        del self.free[block_id]
        block = self.blocks[block_id]
        if block.hash is not None and self.cached.get(block.hash) == block_id:
            del self.cached[block.hash]  # evicted: its old content is overwritten from now on
        block.hash = block.content = None
        block.ref_count = 1
        return block_id

    # -- decoding ----------------------------------------------------------------------------
    def needs_block(self, seq: Sequence) -> bool:
        """Whether the token that goes in next (num_tokens - 1) starts a new block."""
        return seq.num_tokens > len(seq.block_table) * self.block_size

    def can_append(self, seq: Sequence) -> bool:
        """Room for the token that goes in next, a new block if need be."""
        return not self.needs_block(seq) or self.num_free_blocks > 0

    def append(self, seq: Sequence) -> None:
        if self.needs_block(seq):
            seq.block_table.append(self._take_free())

    def commit(self, seq: Sequence, num_new_tokens: int) -> None:
        """After a step: the tokens are computed; blocks they filled become reusable."""
        seq.num_computed_tokens += num_new_tokens
        if not self.enable_prefix_caching:
            return
        for index in range(len(seq.block_hashes), seq.num_computed_tokens // self.block_size):
            parent = seq.block_hashes[-1] if seq.block_hashes else None
            content = self._content(seq, index, parent)
            block_hash = hash(content)
            block = self.blocks[seq.block_table[index]]
            block.hash, block.content = block_hash, content
            self.cached.setdefault(block_hash, block.block_id)  # the first copy stays the one
            seq.block_hashes.append(block_hash)

    def _content(self, seq: Sequence, index: int, parent: int | None) -> BlockContent:
        start = index * self.block_size
        end = start + self.block_size
        # The first block chains to the request's cache_salt: hits only under the same salt.
        root = parent if index else seq.sampling.cache_salt
        return root, tuple(seq.token_ids(start, end)), seq.media_keys(start, end)

    # -- release -----------------------------------------------------------------------------
    def free_blocks(self, seq: Sequence) -> None:
        """Release a finished or preempted sequence's blocks; the tail goes first, so a shared
        prefix is the last to be evicted."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[block_id] = None
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed_tokens = 0
