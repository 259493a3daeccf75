"""The control plane: the one cache manager the simulator, the runtime and the
vLLM connector all drive.

It decides, and only decides. Every operation returns at once: it updates the
prefix index and the tiers, asks the policies, and hands transfer ops to the
data plane it was given. Completions come back through ``complete``; the
manager never waits, never sleeps and starts no threads, so a SimPy process and
a connector thread can both own one.

Block life cycle in a tier: attached (in flight, not readable) -> ready ->
detached (evicted, failed or reset). A block with ``pins > 0`` is used by an
op or a running request and is never evicted.
"""
from __future__ import annotations

from collections.abc import Callable, Collection, Hashable, Sequence
from dataclasses import dataclass, field

from flexkv_runtime.control.index import Block, PrefixIndex, TierKind
from flexkv_runtime.control.ops import DataPlane, OpKind, TransferOp
from flexkv_runtime.control.tiers import Tier
from flexkv_runtime.policies.base import PolicyContext, PrefetchPolicy

WRITE_POLICIES = ("write_through", "write_back", "selective")

# plain ints: these key every block's slot map on the hot path
CPU = int(TierKind.CPU)
GPU = int(TierKind.GPU)
CPU_BIT = 1 << CPU
_KINDS = tuple(TierKind)  # int -> TierKind without the Enum call's cost
# module constants: an Enum member read through its class costs several times a global read
LOAD, STORE, PROMOTE, DEMOTE = OpKind.LOAD, OpKind.STORE, OpKind.PROMOTE, OpKind.DEMOTE


@dataclass(slots=True)
class Lookup:
    """Longest prefixes of a request's blocks that the hierarchy can serve."""

    num_blocks: int
    #: leading blocks whose data is complete in some managed tier: loadable now
    ready_blocks: int
    #: leading blocks present in some tier, complete or still in flight
    pending_blocks: int
    #: tier -> leading blocks complete in that very tier
    per_tier: dict[TierKind, int]


@dataclass(slots=True)
class RequestDone:
    """All loads (or all stores) of one request have finished."""

    request_id: Hashable
    kind: OpKind  # LOAD or STORE
    failed_keys: list[Hashable]


@dataclass
class ManagerStats:
    lookups: int = 0
    block_accesses: int = 0
    #: accesses that found the block in no tier
    block_misses: int = 0
    #: accesses that found the block, by the fastest tier that had it
    block_hits: dict[str, int] = field(default_factory=dict)
    ops_submitted: int = 0
    ops_failed: int = 0
    ops_cancelled: int = 0


class CacheManager:
    def __init__(
        self,
        tiers: Sequence[Tier],
        *,
        data_plane: DataPlane,
        clock: Callable[[], float],
        block_bytes: int,
        write_policy: str = "write_through",
        selective_hits: int = 2,
        prefetch: PrefetchPolicy | None = None,
        prefill_cost: Callable[[int], float] = lambda depth: float(depth + 1),
        oracle: object | None = None,
        allow_offline: bool = True,
        protect_prefix: bool = True,
    ) -> None:
        """``protect_prefix``: a store never evicts the cached block its next block extends
        (a hole right where the prefix grows). Textbook demand paging, as libCacheSim
        simulates it, has no such rule; replay turns it off to compare with it."""
        if write_policy not in WRITE_POLICIES:
            raise ValueError(f"unknown write policy {write_policy!r}; valid choices: {list(WRITE_POLICIES)}")
        if type(selective_hits) is not int or selective_hits < 1:
            raise ValueError(f"selective_hits must be a whole number >= 1, got {selective_hits!r}")
        kinds = [t.kind for t in tiers]
        if CPU not in kinds:
            raise ValueError("the hierarchy needs a CPU tier: every load and store goes through it")
        if len(set(kinds)) != len(kinds) or GPU in kinds:
            raise ValueError(f"tiers must be distinct managed tiers (CPU, SSD, REMOTE), got {[k.name for k in kinds]}")
        self.data_plane = data_plane
        self.clock = clock
        self.block_bytes = block_bytes
        self.write_policy = write_policy
        self._write_back = write_policy == "write_back"
        self._selective = write_policy == "selective"
        self.selective_hits = selective_hits
        self.protect_prefix = protect_prefix
        self.prefetch = prefetch
        self.index = PrefixIndex(prefill_cost)
        self.tiers: dict[TierKind, Tier] = {t.kind: t for t in sorted(tiers, key=lambda t: t.kind)}
        self.cpu = self.tiers[CPU]
        self._all_tiers_mask = sum(1 << kind for kind in self.tiers)
        self.lower = [t for k, t in self.tiers.items() if k > CPU]
        self._write_through = write_policy == "write_through" and bool(self.lower)
        #: keys of blocks the CPU tier's admission refused that pass through it on their way down
        #: (write-through): in a CPU slot, unknown to its eviction policy, freed once copied down
        self._passing: set[Hashable] = set()
        #: (kind, bit in ``Block.ready``) of every tier, fastest first
        self._tier_bits = [(kind, tier.bit) for kind, tier in self.tiers.items()]
        self.stats = ManagerStats(block_hits={k.name: 0 for k in self.tiers})
        self.waiting: dict[Hashable, Sequence[Hashable]] = {}
        self.waiting_refs: dict[Hashable, int] = {}

        for tier in self.tiers.values():
            policy = tier.eviction
            if policy.offline:
                if not allow_offline:
                    raise ValueError(
                        f"eviction policy {policy.name!r} needs the future and is only allowed in replay "
                        "and simulation; choose an online policy for the runtime"
                    )
                if oracle is None:
                    raise ValueError(f"eviction policy {policy.name!r} needs an oracle of future accesses")
            ctx = PolicyContext(clock=clock, waiting_refs=self.waiting_refs, oracle=oracle, tier=tier.kind.name)
            policy.bind(ctx)
            tier.admission.bind(ctx)
        if prefetch is not None:
            prefetch.bind(PolicyContext(clock=clock, waiting_refs=self.waiting_refs, oracle=oracle))

        for kind, tier in self.tiers.items():
            tier.can_evict = self._evictable_in(kind)
        self._next_op_id = 0
        self._ops: dict[int, TransferOp] = {}
        self._op_blocks: dict[int, list[Block]] = {}
        self._held: dict[int, int] = {}  # op id -> ops it still waits for
        self._dependents: dict[int, list[int]] = {}
        self._upstream_failed: dict[int, set[Hashable]] = {}
        self._request_ops: dict[tuple[Hashable, OpKind], set[int]] = {}
        self._request_failed: dict[tuple[Hashable, OpKind], list[Hashable]] = {}

    # ------------------------------------------------------------------ lookups

    def _evictable_in(self, kind: TierKind) -> Callable[[Hashable], bool]:
        bit = 1 << kind
        get = self.index.get

        def can_evict(key: Hashable) -> bool:
            block = get(key)
            return block is not None and not block.pins and block.ready & bit != 0

        return can_evict

    def lookup(self, keys: Sequence[Hashable], request_id: Hashable | None = None) -> Lookup:
        """Longest servable prefix, overall and per tier; touches nothing.

        With a prefetch policy and a request id, the policy may start promoting
        the request's blocks from slower tiers (promote-on-lookup).
        """
        self.stats.lookups += 1
        get = self.index.get
        broken = {}  # tier -> where its ready prefix broke
        contiguous = self._all_tiers_mask  # tiers whose ready prefix is still unbroken
        ready = pending = 0
        for key in keys:
            block = get(key)
            if block is None or not block.slots:
                break
            mask = block.ready
            if ready == pending and mask:
                ready += 1
            pending += 1
            if contiguous & mask != contiguous:
                for kind, bit in self._tier_bits:
                    if contiguous & bit and not mask & bit:
                        broken[kind] = pending - 1
                contiguous &= mask
        per_tier = {}
        for kind, bit in self._tier_bits:
            per_tier[kind] = pending if contiguous & bit else broken[kind]
        if self.prefetch is not None and request_id is not None:
            self._promote(self.prefetch.on_lookup(request_id, keys))
        return Lookup(len(keys), ready, pending, per_tier)

    def should_wait(self, lookup: Lookup, waited_s: float) -> bool:
        """Whether a request should keep waiting for its in-flight blocks (prefetch stop rule)."""
        if lookup.pending_blocks <= lookup.ready_blocks or self.prefetch is None:
            return False
        return self.prefetch.should_wait(waited_s)

    # -------------------------------------------------------------- queue events

    def on_request_waiting(self, request_id: Hashable, keys: Sequence[Hashable]) -> None:
        """A request joined the scheduler's queue: lookahead policies may now protect or prefetch its blocks."""
        if request_id in self.waiting:
            return
        self.waiting[request_id] = keys
        refs = self.waiting_refs
        for key in keys:
            refs[key] = refs.get(key, 0) + 1
        if self.prefetch is not None:
            self._promote(self.prefetch.on_waiting(list(self.waiting.items())))

    def on_request_running(self, request_id: Hashable) -> None:
        self._leave_queue(request_id)

    def on_request_finished(self, request_id: Hashable) -> None:
        self._leave_queue(request_id)

    def _leave_queue(self, request_id: Hashable) -> None:
        keys = self.waiting.pop(request_id, None)
        if keys is None:
            return
        refs = self.waiting_refs
        for key in keys:
            left = refs[key] - 1
            if left:
                refs[key] = left
            else:
                del refs[key]

    # -------------------------------------------------------------------- loads

    def plan_load(
        self,
        request_id: Hashable,
        keys: Sequence[Hashable],
        start: int,
        gpu_block_ids: Sequence[int],
    ) -> int:
        """Load ``keys[start:start+len(gpu_block_ids)]`` into the engine's blocks.

        Blocks found only in a slower tier are promoted into the CPU tier first.
        Returns how many blocks will be loaded: the plan stops at the first block
        that is not ready anywhere or for which no CPU slot can be freed. Every
        block of the plan is pinned until its op completes; ``RequestDone(LOAD)``
        reports the end.
        """
        now = self.clock()
        cpu, get, ready_source, running = self.cpu, self.index.get, self._ready_source, self._ops
        on_hit, passing = cpu.eviction.on_hit, self._passing
        block_hits = self.stats.block_hits
        loaded: list[Block] = []
        promotions: dict[TierKind, list[tuple[Block, int, int]]] = {}
        waits: list[int] = []
        cpu_hits = 0
        for key in keys[start : start + len(gpu_block_ids)]:
            block = get(key)
            if block is None:
                break
            block.last_access = now
            if block.ready & CPU_BIT:
                cpu_hits += 1
                if passing and key in passing:
                    self._keep_passing(key, block)
                else:
                    on_hit(key, block)
            elif CPU in block.slots:  # on its way into the CPU tier: wait for it
                if block.arriving not in running:
                    break
                waits.append(block.arriving)
                if passing and key in passing:
                    self._keep_passing(key, block)
                cpu_hits += 1
            else:
                source = ready_source(block)
                if source is None:
                    break
                slot = self._make_room(cpu, block, waits)
                if slot is None:
                    break
                block.slots[CPU] = slot
                cpu.eviction.on_insert(key, block)
                cpu.stats.inserts += 1
                source.stats.hits += 1
                source.eviction.on_hit(key, block)
                block_hits[source.name] += 1
                promotions.setdefault(source.kind, []).append((block, block.slots[source.slot_key], slot))
            block.hits += 1
            block.pins += 1  # held until the ops below take their own pins
            loaded.append(block)
        cpu.stats.hits += cpu_hits
        block_hits["CPU"] += cpu_hits
        self.stats.block_accesses += len(loaded)
        if not loaded:
            return 0
        for kind, moves in promotions.items():
            blocks, src_slots, dst_slots = (list(x) for x in zip(*moves))
            waits.append(self._new_op(PROMOTE, kind, CPU, blocks, src_slots, dst_slots, request_id, waits))
        cpu_slots = [b.slots[CPU] for b in loaded]
        self._new_op(LOAD, CPU, GPU, loaded, cpu_slots, list(gpu_block_ids[: len(loaded)]), request_id, waits)
        for block in loaded:
            block.pins -= 1
        return len(loaded)

    # ------------------------------------------------------------------- stores

    def plan_store(
        self,
        request_id: Hashable,
        keys: Sequence[Hashable],
        gpu_block_ids: Sequence[int],
        start: int = 0,
        request_tokens: int = 0,
    ) -> int:
        """Offer ``keys[start:start+len(gpu_block_ids)]``, computed in the engine's blocks, to the CPU tier.

        Every offered block counts as an access: one already cached is a hit and
        is touched; a new one is admitted (admission policy, then a slot, evicting
        if needed) and copied from the engine. Under write-through a block the
        admission refuses still passes through a CPU slot on its way down (see
        ``_let_pass``). After the first block that gets no slot no later block of
        the request is stored, since a prefix with a hole is not reusable past
        the hole. Returns the number of blocks being stored.
        """
        now = self.clock()
        cpu, index, hit_lower = self.cpu, self.index, self._hit_lower
        selective = self._selective
        on_hit, on_insert = cpu.eviction.on_hit, cpu.eviction.on_insert
        protect = self.protect_prefix
        make_room, admits_all, admit, free = self._make_room, cpu.admits_all, cpu.admission.admit, cpu.free_slots
        passing, write_through = self._passing, self._write_through
        get, create = index.get, index.create
        parent = index.chain(keys, start)
        storing: list[Block] = []
        engine_slots: list[int] = []
        cpu_slots: list[int] = []
        waits: list[int] = []
        refused = False
        accesses = cpu_hits = misses = passed = 0
        for key, engine_slot in zip(keys[start:], gpu_block_ids):
            block = get(key) or create(key, parent)
            parent = block
            accesses += 1
            block.last_access = now
            slots = block.slots
            if CPU in slots:
                block.hits += 1
                cpu_hits += 1
                if passing and key in passing:
                    self._keep_passing(key, block)
                elif block.ready & CPU_BIT:
                    on_hit(key, block)
                    if selective and block.hits >= self.selective_hits:
                        self._copy_down([block])
                continue
            if slots:  # not in the CPU tier, so in a slower one
                hit_lower(block)
            else:
                misses += 1
            if refused:
                cpu.admission.observe(key, block, request_tokens)
                continue
            if free and admits_all:
                slots[CPU] = free.pop()
                on_insert(key, block)
            else:
                previous = block.parent
                if previous is not None and protect:
                    previous.pins += 1  # the prefix this block extends must not make its room
                admitted = admits_all or admit(key, block, request_tokens)
                if not admitted:
                    cpu.stats.rejected += 1
                slot = make_room(cpu, block, waits) if admitted or write_through else None
                if previous is not None and protect:
                    previous.pins -= 1
                if slot is None:
                    refused = True
                    continue
                slots[CPU] = slot
                if admitted:
                    on_insert(key, block)
                else:  # written through to the slower tiers, not kept here
                    passing.add(key)
                    passed += 1
            block.request_tokens = request_tokens
            storing.append(block)
            engine_slots.append(engine_slot)
            cpu_slots.append(slots[CPU])
        self.stats.block_accesses += accesses
        self.stats.block_misses += misses
        self.stats.block_hits["CPU"] += cpu_hits
        cpu.stats.hits += cpu_hits
        cpu.stats.inserts += len(storing) - passed
        if storing:
            self._new_op(STORE, GPU, CPU, storing, engine_slots, cpu_slots, request_id, waits)
        index.forget_if_unused(parent)  # the refused tail, if any
        return len(storing)

    def _keep_passing(self, key: Hashable, block: Block) -> None:
        """A block passing through the CPU tier was asked for again before it left: it stays, as a resident."""
        self._passing.discard(key)
        self.cpu.eviction.on_insert(key, block)
        self.cpu.stats.inserts += 1

    def _let_pass(self, blocks: list[Block]) -> None:
        """Free the CPU slots of passing blocks that no op uses any more: their copies below are made."""
        passing, cpu = self._passing, self.cpu
        for block in blocks:
            if not block.pins and block.key in passing:
                passing.discard(block.key)
                cpu.release_slot(self.index.detach(block, CPU))

    def _hit_lower(self, block: Block) -> None:
        """Count an access served by the fastest slower tier that holds the block (one must)."""
        for tier in self.lower:
            if tier.slot_key in block.slots:
                block.hits += 1
                tier.stats.hits += 1
                self.stats.block_hits[tier.name] += 1
                if block.ready & tier.bit:
                    tier.eviction.on_hit(block.key, block)
                return

    def _ready_source(self, block: Block) -> Tier | None:
        """The fastest slower tier holding a complete copy of ``block``, if any."""
        ready = block.ready
        for tier in self.lower:
            if ready & tier.bit:
                return tier
        return None

    def _admit(self, tier: Tier, block: Block, waits: list[int]) -> int | None:
        """The admission policy's consent, then a slot for ``block``, evicting if needed.

        Returns the slot, or None; appends to ``waits`` the ops that must finish
        before the slot is overwritten (a write-back demotion still reading the
        evicted block). The block is pinned while room is made, so the eviction
        can neither choose it nor forget its record when the victim is its last child.
        """
        if not tier.admits_all and not tier.admission.admit(block.key, block, block.request_tokens):
            tier.stats.rejected += 1
            return None
        return self._make_room(tier, block, waits)

    def _make_room(self, tier: Tier, block: Block, waits: list[int]) -> int | None:
        """A slot of ``tier`` for ``block`` (see ``_admit``), with no admission check:
        promotions on the way to the engine must pass through the CPU tier."""
        free = tier.free_slots
        if free:
            return free.pop()
        block.pins += 1
        key = tier.eviction.victim(tier.can_evict)
        if key is None:
            block.pins -= 1
            tier.stats.rejected += 1
            return None
        index = self.index
        victim = index.get(key)
        tier.stats.evictions += 1
        if self._write_back:
            waits.extend(self._copy_down([victim], source=tier, next_only=True))
        slot = index.detach(victim, tier.slot_key)
        if tier is not self.cpu:
            self.data_plane.release(tier.kind, [slot])
        block.pins -= 1
        return slot

    def _copy_down(self, blocks: list[Block], source: Tier | None = None, next_only: bool = False) -> list[int]:
        """Copy ready blocks from ``source`` (the CPU tier) into the slower tiers that lack them.

        Returns the ids of the ops started. ``next_only`` restricts the copy to
        the tier just below (write-back demotion on eviction).
        """
        source = source or self.cpu
        targets = self.lower if source is self.cpu else [t for t in self.lower if t.kind > source.kind]
        if next_only:
            targets = targets[:1]
        src_kind, src_bit = source.slot_key, source.bit
        started = []
        for target in targets:
            kind, free, admits_all = target.slot_key, target.free_slots, target.admits_all
            on_insert = target.eviction.on_insert
            moving: list[Block] = []
            src_slots: list[int] = []
            dst_slots: list[int] = []
            waits: list[int] = []
            for block in blocks:
                slots = block.slots
                if kind in slots or not block.ready & src_bit:
                    continue
                if free and admits_all:
                    slot = free.pop()
                else:
                    slot = self._admit(target, block, waits)
                    if slot is None:
                        continue
                slots[kind] = slot
                on_insert(block.key, block)
                moving.append(block)
                src_slots.append(slots[src_kind])
                dst_slots.append(slot)
            if moving:
                target.stats.inserts += len(moving)
                started.append(self._new_op(DEMOTE, src_kind, kind, moving, src_slots, dst_slots, None, waits))
        return started

    def _promote(self, keys: Sequence[Hashable]) -> None:
        """Bring ready blocks from slower tiers into the CPU tier in the background (prefetch)."""
        get = self.index.get
        moves: dict[TierKind, list[tuple[Block, int, int]]] = {}
        waits: list[int] = []
        for key in keys:
            block = get(key)
            if block is None:
                break  # past a hole nothing is reusable
            if CPU in block.slots:
                continue
            source = self._ready_source(block)
            if source is None:
                break
            slot = self._make_room(self.cpu, block, waits)
            if slot is None:
                break
            block.slots[CPU] = slot
            self.cpu.eviction.on_insert(key, block)
            self.cpu.stats.inserts += 1
            moves.setdefault(source.kind, []).append((block, block.slots[source.kind], slot))
        for kind, items in moves.items():
            blocks, src_slots, dst_slots = (list(x) for x in zip(*items))
            self._new_op(PROMOTE, kind, CPU, blocks, src_slots, dst_slots, None, waits)

    # ---------------------------------------------------------------------- ops

    def _new_op(
        self,
        kind: OpKind,
        src: TierKind,
        dst: TierKind,
        blocks: list[Block],
        src_slots: list[int],
        dst_slots: list[int],
        request_id: Hashable | None,
        after: Sequence[int],
    ) -> int:
        op_id = self._next_op_id
        self._next_op_id += 1
        running = self._ops
        op = TransferOp(op_id, kind, _KINDS[src], _KINDS[dst], [b.key for b in blocks], src_slots, dst_slots,
                        self.block_bytes, request_id, [a for a in after if a in running] if after else [])
        if dst == CPU:
            for block in blocks:
                block.pins += 1
                block.arriving = op_id
        else:
            for block in blocks:
                block.pins += 1
        self._ops[op_id] = op
        self._op_blocks[op_id] = blocks
        if request_id is not None:
            group = (request_id, _group(kind))
            pending = self._request_ops.get(group)
            if pending is None:
                self._request_ops[group] = {op_id}
            else:
                pending.add(op_id)
        if op.after:
            self._held[op_id] = len(op.after)
            for dep in op.after:
                self._dependents.setdefault(dep, []).append(op_id)
        else:
            self._submit(op)
        return op_id

    def _submit(self, op: TransferOp) -> None:
        self.stats.ops_submitted += 1
        self.data_plane.submit(op)

    def complete(self, op_id: int, failed_keys: Collection[Hashable] = ()) -> list[RequestDone]:
        """The data plane finished an op; ``failed_keys`` are the blocks it could not move.

        A block that failed to be read from a slower tier (checksum, missing
        file) is dropped from that tier: it is never served. Returns the
        requests whose loads or stores are now all done.
        """
        op = self._ops[op_id]
        failed = set(failed_keys)
        if failed:
            self.stats.ops_failed += 1
        return self._finish(op, failed, source_suspect=True)

    def _finish(self, op: TransferOp, failed: set[Hashable], source_suspect: bool) -> list[RequestDone]:
        op_id = op.op_id
        del self._ops[op_id]
        blocks = self._op_blocks.pop(op_id)
        self._held.pop(op_id, None)
        src_tier, dst_tier = self.tiers.get(op.src), self.tiers.get(op.dst)
        nbytes = self.block_bytes
        dst_bit = dst_tier.bit if dst_tier is not None else 0
        if not failed:
            for block in blocks:
                block.pins -= 1
                block.ready |= dst_bit
            done = blocks
        else:
            done = []
            for block in blocks:
                block.pins -= 1
                if block.key not in failed:
                    block.ready |= dst_bit
                    done.append(block)
                    continue
                if dst_tier is not None and dst_tier.kind in block.slots and not block.ready_in(dst_tier.kind):
                    self._drop(dst_tier, block)
                    dst_tier.stats.failed += 1
                if source_suspect and src_tier is not None and src_tier.kind != CPU and src_tier.kind in block.slots:
                    self._drop(src_tier, block)
                    src_tier.stats.failed += 1
                self.index.forget_if_unused(block)
        moved = len(done) * nbytes
        if dst_tier is not None:
            dst_tier.stats.bytes_in += moved
        if src_tier is not None:
            src_tier.stats.bytes_out += moved
        if op.kind is STORE and done and self._write_through:
            self._copy_down(done)
        if self._passing:
            self._let_pass(blocks)

        events: list[RequestDone] = []
        for dependent in self._dependents.pop(op_id, ()):
            if dependent not in self._ops:
                continue
            if failed:
                self._upstream_failed.setdefault(dependent, set()).update(failed)
            self._held[dependent] -= 1
            if self._held[dependent] == 0:
                events.extend(self._release(self._ops[dependent]))
        if op.request_id is not None:
            events.extend(self._account(op, failed))
        return events

    def _release(self, op: TransferOp) -> list[RequestDone]:
        """Submit an op whose prerequisites are done; a load loses everything from its first failed block on."""
        del self._held[op.op_id]
        failed = self._upstream_failed.pop(op.op_id, set())
        if op.kind is LOAD and failed:
            cut = next((i for i, key in enumerate(op.keys) if key in failed), len(op.keys))
            lost = set(op.keys[cut:])
            if cut == 0:
                return self._finish(op, lost, source_suspect=False)
            blocks = self._op_blocks[op.op_id]
            for block in blocks[cut:]:
                block.pins -= 1
                self.index.forget_if_unused(block)
            self._op_blocks[op.op_id] = blocks[:cut]
            del op.keys[cut:], op.src_slots[cut:], op.dst_slots[cut:]
            self._request_failed.setdefault((op.request_id, LOAD), []).extend(lost)
        self._submit(op)
        return []

    def _account(self, op: TransferOp, failed: set[Hashable]) -> list[RequestDone]:
        group = (op.request_id, _group(op.kind))
        if failed:
            self._request_failed.setdefault(group, []).extend(k for k in op.keys if k in failed)
        pending = self._request_ops.get(group)
        if pending is None:
            return []
        pending.discard(op.op_id)
        if pending:
            return []
        del self._request_ops[group]
        failed_keys = list(dict.fromkeys(self._request_failed.pop(group, [])))  # a block can fail upstream and here
        return [RequestDone(op.request_id, group[1], failed_keys)]

    def _drop(self, tier: Tier, block: Block) -> None:
        if tier is self.cpu and block.key in self._passing:
            self._passing.discard(block.key)  # its eviction policy never knew it
        else:
            tier.eviction.on_remove(block.key)
        slot = self.index.detach(block, tier.kind)
        tier.release_slot(slot)
        if tier.kind != CPU:
            self.data_plane.release(tier.kind, [slot])

    def cancel(self, request_id: Hashable) -> bool:
        """Drop the request's ops that have not started and release their pins.

        Returns True when nothing of the request is still moving; otherwise the
        running ops complete normally and their ``RequestDone`` still comes.
        """
        all_stopped = True
        for kind in (LOAD, STORE):
            group = (request_id, kind)
            for op_id in sorted(self._request_ops.get(group, ())):
                op = self._ops.get(op_id)
                if op is None:
                    continue
                if op_id in self._held or self.data_plane.cancel(op_id):
                    self.stats.ops_cancelled += 1
                    self._request_ops[group].discard(op_id)
                    self._finish(op, set(op.keys), source_suspect=False)
                else:
                    all_stopped = False
            if not self._request_ops.get(group):
                self._request_ops.pop(group, None)
                self._request_failed.pop(group, None)
        self._leave_queue(request_id)
        return all_stopped

    # ------------------------------------------------------------------- admin

    @property
    def ops_in_flight(self) -> int:
        return len(self._ops)

    def pinned_blocks(self) -> int:
        return sum(1 for b in self.index.blocks() if b.pins)

    def is_passing(self, key: Hashable) -> bool:
        """Whether the block is only passing through the CPU tier (refused there, on its way down):
        in a CPU slot, but no resident of the tier as far as its eviction policy knows."""
        return key in self._passing

    def reset(self) -> int:
        """Forget every block no op is using (``reset_cache``); returns how many copies were dropped."""
        dropped = 0
        for block in list(self.index.blocks()):
            if block.pins:
                continue
            for kind in sorted(block.slots, reverse=True):
                if block.ready_in(kind):
                    self._drop(self.tiers[kind], block)
                    dropped += 1
        return dropped

    def adopt(self, kind: TierKind, entries: Sequence[tuple[Hashable, Hashable | None, int]]) -> int:
        """Take in blocks a persistent tier already holds (an SSD directory after a restart).

        ``entries`` are ``(key, parent_key, slot)`` in any order; parents are
        linked when known. Returns how many blocks were adopted; slots the tier
        cannot take (out of range, duplicates) are skipped.
        """
        tier = self.tiers[kind]
        by_key = {key: (parent, slot) for key, parent, slot in entries}
        unclaimed = tier.take_slots(slot for _, slot in by_key.values())
        adopted = 0

        def place(key: Hashable) -> Block:
            nonlocal adopted
            block = self.index.get(key)
            if block is not None:
                return block
            parent_key, slot = by_key[key]
            parent = place(parent_key) if parent_key in by_key else None
            block = self.index.get_or_create(key, parent)
            if slot not in unclaimed:  # out of range, or another block's
                return block
            unclaimed.discard(slot)
            block.slots[kind] = slot
            block.ready |= 1 << kind
            tier.eviction.on_insert(key, block)
            adopted += 1
            return block

        for key in by_key:
            place(key)
        for slot in unclaimed:  # taken for a block the index already knew: not adopted, so free again
            tier.release_slot(slot)
        return adopted

    def check_invariants(self) -> None:
        """Raise AssertionError if the index, the tiers and the policies disagree (for tests)."""
        for kind, tier in self.tiers.items():
            holders = [b for b in self.index.blocks() if kind in b.slots]
            assert len(holders) == tier.used_blocks <= tier.capacity_blocks, (kind, len(holders), tier.used_blocks)
            passing = len(self._passing) if tier is self.cpu else 0
            assert len(tier.eviction) + passing == tier.used_blocks, (kind, len(tier.eviction), tier.used_blocks)
            assert len({b.slots[kind] for b in holders}) == len(holders), f"{kind.name}: two blocks share a slot"
        for key in self._passing:  # on its way down: an op holds it, or its slot would never be freed
            block = self.index.get(key)
            assert block is not None and CPU in block.slots and block.pins > 0, f"passing block {block} is stuck"
        for block in self.index.blocks():
            assert block.pins >= 0, block
            assert self.index.get(block.key) is block
            if block.parent is not None:
                assert self.index.get(block.parent.key) is block.parent, f"{block}'s parent record was forgotten"

    def occupancy(self) -> dict[str, int]:
        return {k.name: t.used_blocks for k, t in self.tiers.items()}


def _group(kind: OpKind) -> OpKind:
    """Loads and the promotions feeding them finish a request's load; stores its store."""
    return STORE if kind is STORE else LOAD
