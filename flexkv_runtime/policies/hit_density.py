"""Hit density over prefix-tree classes: LHD (Beckmann et al., NSDI'18) for KV blocks.

Every resident block belongs to a class that says what kind of block it is, and
the policy learns online, per class, how likely a block of a given age is to
be read again and how long it will hold its slot until then. Its *hit density*

    expected hits from now on / expected slot-time it will still occupy

given its class and its age (tier accesses since its last use) ranks it; the
victim is the block of lowest density. Classes:

- ``reuse r`` (1 .. ``max_reuse``): blocks seen r times before, counted across
  evictions through a ghost table of recently seen keys. Shared prefixes
  (system prompts, documents, a conversation's earlier turns) climb here.
- ``new``: first-seen blocks; with ``size_classes`` > 1, split by log2 of the
  length (in blocks) of the request that stored them, learned when its last
  block is stored (long one-off prompts are rarely read again).
- ``tail``: the last block a request stored. It is partial in most prompts and
  the next turn of a conversation changes it, so it is almost never read
  again; the policy finds this class worthless by itself (it assumes nothing
  about block sizes).

Per class it keeps histograms of the ages at which blocks were hit and left,
decayed at every reconfiguration (every ``reconfigure_factor * capacity``
accesses) so they follow a drifting workload; ages are binned four to an
octave, so one table spans seconds to hours. Evictions are not censored: an
evicted block stays in the ghost with its class and last use, and counts as a hit
at the age it would have had if it comes back while remembered, or as leaving
at the age it would have reached if it does not. So the policy learns what
keeping a block longer would have paid, not only what its own evictions let it
see (plain LHD never sees a hit past the age at which it evicts, and keeps
evicting there). Refusals are not censored either: a block the admission
refuses (or one past a refusal in its request) is remembered as if stored in
its class and evicted at once. Without that, a class the admission turned away
never showed the hits it would have had and went on being refused: in the
simulator with four engines splitting the Mooncake trace, the admission cost
1.3 points of prefix-token hit ratio against LRU and now gains 0.7. With no
data yet every class gets one density falling with age: LRU.

Prefix awareness: a block is worth nothing past a hole in its prefix, so only
leaves of the cached prefix tree (blocks with no resident child in this tier)
are candidates, and cached prefixes shrink from their ends. Within a class the
least recently used leaf is taken as the one of lowest density (learned
densities fall with age on KV workloads), so each class keeps its leaves in a
lazy heap by last use and a victim costs one density lookup per class.

The matching admission policy (``admission: hit_density``) asks this object
whether an incoming block's class is worth the slot of the block it would
displace (its best density at any age against the victim's density).
"""
from __future__ import annotations

import weakref
from heapq import heapify, heappop, heappush, heapreplace

from flexkv_runtime.policies.base import EvictionPolicy, PolicyContext

#: id(ctx) -> the hit_density eviction policy bound to that context (one per tier)
_BY_CONTEXT: weakref.WeakValueDictionary = weakref.WeakValueDictionary()

PRIOR = 1e-3  # pseudo-hits: a class with no data ranks by age alone, like LRU
TAIL = 0  # class ids: request tails, then first-seen blocks by request size, then reuse 1 .. max_reuse
INF = float("inf")

# a resident block's record, one list per key
CLS, SEEN, LAST, PARENT, DEPTH, KEY = range(6)


def partner_for(ctx: PolicyContext) -> HitDensity | None:
    """The hit_density eviction policy bound to ``ctx`` (the same tier), if any."""
    policy = _BY_CONTEXT.get(id(ctx))
    return policy if policy is not None and policy.ctx is ctx else None


def _bin_start(b: int) -> int:
    """First age (in units) of bin ``b``: eight bins one unit wide, then four per octave."""
    if b < 8:
        return b
    e = b // 4 - 1
    return (b - 4 * e) << e


class HitDensity(EvictionPolicy):
    name = "hit_density"

    def __init__(
        self,
        capacity_blocks: int,
        max_reuse: int = 2,
        size_classes: int = 3,
        ghost_factor: float = 2.5,
        age_bins: int = 96,
        reconfigure_factor: float = 0.5,
        decay: float = 0.92,
    ) -> None:
        super().__init__(capacity_blocks)
        if max_reuse < 1 or size_classes < 1:
            raise ValueError(f"hit_density max_reuse and size_classes must be >= 1, got {max_reuse}, {size_classes}")
        if ghost_factor < 0:
            raise ValueError(f"hit_density ghost_factor must be >= 0, got {ghost_factor}")
        if age_bins < 9:
            raise ValueError(f"hit_density age_bins must be >= 9, got {age_bins}")
        if reconfigure_factor <= 0:
            raise ValueError(f"hit_density reconfigure_factor must be > 0, got {reconfigure_factor}")
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"hit_density decay must be in (0, 1], got {decay}")
        self.max_reuse = max_reuse
        self.size_classes = size_classes
        self.ghost_factor = ghost_factor
        self.age_bins = age_bins
        self.reconfigure_factor = reconfigure_factor
        self.decay = decay

        self._reuse_base = size_classes  # class of a block seen r > 0 times before: this + min(r, max_reuse)
        classes = 1 + size_classes + max_reuse
        self._meta: dict = {}  # resident key -> [class, times seen, last access, parent key, depth, key]
        self._kids: dict = {}  # key (resident or not) -> its resident children, only while it has some
        self._heaps: list[list] = [[] for _ in range(classes)]  # per class: (last access, key) of leaves, lazily
        # per class, its head (least recently used leaf): heap entry, density, until when that density holds
        self._head_entry: list = [None] * classes
        self._head_density: list[float] = [INF] * classes
        self._head_until: list[float] = [INF] * classes
        self._dirty: set[int] = set(range(classes))  # classes whose head must be looked at again
        self._valid_until: float = INF  # the earliest head_until
        # key -> times seen | (class when evicted + 1, or 0) << 8 | last use << 16, packed in one int
        # (no allocation per eviction); two generations, the older dropped whole
        self._ghost: dict = {}
        self._ghost_old: dict = {}
        self._ghost_half = max(1, int(capacity_blocks * ghost_factor) // 2)
        self._pending = None  # the last stored block: a tail unless its child comes next
        # the current run (blocks stored in a row by one request): when it began, and its first-seen
        # blocks of a class below the largest size class (the request's size may raise them)
        self._run_start = 0
        self._young: list[list] = []
        self._pending_queued = False  # whether the pending block is in a heap already

        self._now = 0  # tier accesses so far: the age clock
        self._shift = max(0, (capacity_blocks // 64).bit_length() - 1)  # ages in units of ~capacity/64
        self._last_bin = age_bins - 1
        self._edges = [_bin_start(b) << self._shift for b in range(age_bins + 1)]
        self._hits = [[0.0] * age_bins for _ in range(classes)]
        self._leaves = [[0.0] * age_bins for _ in range(classes)]
        self._density = [[0.0] * age_bins for _ in range(classes)]
        self._peak = [0.0] * classes  # each class's best density at any age
        self._lowest_peak = 0.0  # over the classes a block can be offered in (all but tails)
        self._interval = max(1024, int(capacity_blocks * reconfigure_factor))
        self._next_reconfigure = self._interval
        self._threshold: float | None = None  # the density of the current victim, for admission
        self._reconfigure()

    def bind(self, ctx: PolicyContext) -> None:
        super().bind(ctx)
        _BY_CONTEXT[id(ctx)] = self

    # ---------------------------------------------------------------- learning

    def _reconfigure(self) -> None:
        """Histograms -> density at each age (given the block reached it), then decay them."""
        edges, decay = self._edges, self.decay
        for cls, (hits, leaves, density) in enumerate(zip(self._hits, self._leaves, self._density)):
            hit_sum = event_sum = lifetime = 0.0
            for b in range(self._last_bin, -1, -1):
                hit_sum += hits[b]
                event_sum += hits[b] + leaves[b]
                lifetime += event_sum * (edges[b + 1] - edges[b])  # each block that outlives bin b spends it here
                density[b] = (hit_sum + PRIOR) / (lifetime + edges[b + 1])
                hits[b] *= decay
                leaves[b] *= decay
            self._peak[cls] = max(density)
        self._lowest_peak = min(self._peak[TAIL + 1 :])
        self._dirty.update(range(len(self._heaps)))
        self._threshold = None
        if sum(map(len, self._heaps)) > 2 * len(self._meta) + 1024:
            self._rebuild()  # stale heap entries (blocks used again or evicted) outnumber the leaves

    def _bin(self, age: int) -> int:
        """The histogram bin of ``age``; on_hit, _set_head and _expire inline it (a call per block saved)."""
        a = age >> self._shift
        if a >= 8:
            e = a.bit_length() - 3
            a = 4 * e + (a >> e)
        return a if a < self._last_bin else self._last_bin

    def _tick(self) -> int:
        now = self._now = self._now + 1
        if now >= self._next_reconfigure:
            self._next_reconfigure = now + self._interval
            self._reconfigure()
        return now

    def _class_of(self, seen: int, blocks: int) -> int:
        """Class of a block seen ``seen`` times, stored by a request of at least ``blocks`` blocks."""
        if seen > 1:
            return self._reuse_base + min(seen - 1, self.max_reuse)
        return 1 + min(blocks.bit_length() - 1, self.size_classes - 1)

    def _forget(self, cls: int, key) -> None:
        """``key``'s entry in class ``cls`` went stale (used, reclassified, no longer a leaf, gone)."""
        head = self._head_entry[cls]
        if head is not None and head[1] == key:
            self._dirty.add(cls)

    def _push(self, meta: list) -> None:
        """The block of record ``meta`` (a leaf now) enters its class heap, at its last use."""
        cls, last = meta[CLS], meta[LAST]
        heappush(self._heaps[cls], (last, meta[KEY]))
        head = self._head_entry[cls]
        if head is None or last <= head[0]:
            self._dirty.add(cls)

    # ------------------------------------------------------------------ ghost

    def _offered_class(self, key, block) -> int:
        """The class a block that is not stored would enter now (before its request's size is known)."""
        packed = self._ghost.get(key) or self._ghost_old.get(key)
        return self._class_of((packed & 255 if packed else 0) + 1, block.depth + 1)

    def _remember(self, key, cls: int) -> None:
        """A key offered but not stored (refused, or past a refusal in its request) is remembered as if
        stored in class ``cls`` and evicted at once: its return counts as a hit keeping it would have
        been, its absence as the slot-time it would have held, so refusals no more censor what the
        policy learns than evictions do. A return of a key remembered before counts the same way."""
        ghost = self._ghost
        now = self._now
        old = ghost.pop(key, None) or self._ghost_old.pop(key, None)
        if old:
            seen = (old & 255) + 1
            old_cls = (old >> 8 & 255) - 1
            if old_cls >= 0:
                self._hits[old_cls][self._bin(now - (old >> 16))] += 1.0
        else:
            seen = 1
        ghost[key] = (seen if seen < 255 else 255) | (cls + 1) << 8 | now << 16
        if len(ghost) >= self._ghost_half:
            self._expire(self._ghost_old)
            self._ghost_old = ghost
            self._ghost = {}

    def _expire(self, entries: dict) -> None:
        """Evicted blocks that did not come back while remembered: each counts as leaving at the
        age it would have reached by now (keeping it would have cost its slot that long)."""
        now, leaves, shift, last_bin = self._now, self._leaves, self._shift, self._last_bin
        for packed in entries.values():
            cls = (packed >> 8 & 255) - 1
            if cls >= 0:
                b = (now - (packed >> 16)) >> shift
                if b >= 8:
                    e = b.bit_length() - 3
                    b = 4 * e + (b >> e)
                leaves[cls][b if b < last_bin else last_bin] += 1.0

    # ------------------------------------------------------------- the interface

    def on_insert(self, key, block) -> None:
        now = self._now = self._now + 1
        if now >= self._next_reconfigure:
            self._next_reconfigure = now + self._interval
            self._reconfigure()
        parent = block.parent
        parent_key = parent.key if parent is not None else None
        pending = self._pending
        if pending is None or pending != parent_key:  # else the pending block has a child: it never enters a heap
            if pending is not None:
                self._end_of_request()
            self._run_start = now
            self._young = []
        packed = self._ghost.pop(key, None) or self._ghost_old.pop(key, None)
        if packed:
            cls = (packed >> 8 & 255) - 1
            if cls >= 0:  # it was evicted: count the hit that keeping it would have been
                self._hits[cls][self._bin(now - (packed >> 16))] += 1.0
            seen = (packed & 255) + 1
        else:
            seen = 1
        depth = block.depth
        if seen > 1:
            cls = self._reuse_base + (seen - 1 if seen <= self.max_reuse else self.max_reuse)
        else:  # for now: its request is at least this long
            cls = (depth + 1).bit_length()
            if cls > self.size_classes:
                cls = self.size_classes
        meta = self._meta
        if parent_key is not None:  # counted whether or not the parent is resident now
            kids = self._kids
            if parent_key in kids:
                kids[parent_key] += 1
            else:
                kids[parent_key] = 1  # no longer a leaf: any heap entry of it is stale
                if parent_key != pending or self._pending_queued:  # else it is in no heap yet
                    parent_meta = meta.get(parent_key)
                    if parent_meta is not None:
                        head = self._head_entry[parent_meta[CLS]]
                        if head is not None and head[1] == parent_key:
                            self._dirty.add(parent_meta[CLS])
        record = meta[key] = [cls, seen, now, parent_key, depth, key]
        if seen > 1:
            self._young = []  # blocks stored before this one keep their class: this one is reused
        elif cls < self.size_classes:
            self._young.append(record)
        self._pending = key  # enters its class heap when its request ends without a child for it
        self._pending_queued = False

    def _end_of_request(self, tail: bool = True) -> None:
        """The pending block is the last its request stores. If the request ended there
        (``tail``), a first-seen leaf becomes a tail and the first-seen blocks stored with it
        learn the request's size (their class); a leaf that is not a tail enters its heap."""
        key, self._pending = self._pending, None
        queued, self._pending_queued = self._pending_queued, False
        meta = self._meta.get(key)
        if meta is None:
            return
        kids = self._kids
        if tail and self.size_classes > 1:
            cls = self._class_of(1, meta[DEPTH] + 1)
            for node in self._young:
                if node[CLS] != cls:
                    self._forget(node[CLS], node[KEY])
                    node[CLS] = cls
                    if node is not meta and node[KEY] not in kids:
                        self._push(node)
        if key in kids:
            return
        if tail and meta[SEEN] == 1:
            self._forget(meta[CLS], key)
            meta[CLS] = TAIL
        elif queued and (not tail or self.size_classes == 1):
            return
        self._push(meta)  # keeps its age

    def _queue_pending(self) -> None:
        """Make the pending block a candidate now (a victim is wanted before its request ends)."""
        key = self._pending
        self._pending_queued = True
        if key not in self._kids:
            meta = self._meta[key]
            self._push(meta)

    def on_hit(self, key, block) -> None:
        now = self._now = self._now + 1
        if now >= self._next_reconfigure:
            self._next_reconfigure = now + self._interval
            self._reconfigure()
        meta = self._meta[key]
        pending = self._pending
        if pending is not None:
            parent = block.parent
            if parent is not None and parent.key == pending:
                self._end_of_request(tail=False)  # the request goes on through a block stored before
            else:
                self._end_of_request()
        cls = meta[CLS]
        age = (now - meta[LAST]) >> self._shift
        if age >= 8:
            e = age.bit_length() - 3
            age = 4 * e + (age >> e)
        self._hits[cls][age if age < self._last_bin else self._last_bin] += 1.0
        head = self._head_entry[cls]
        if head is not None and head[1] == key:
            self._dirty.add(cls)
        seen = meta[SEEN] = meta[SEEN] + 1
        cls = meta[CLS] = self._reuse_base + (seen - 1 if seen <= self.max_reuse else self.max_reuse)
        meta[LAST] = now
        if key not in self._kids:  # only leaves are candidates; a new entry is the youngest
            heappush(self._heaps[cls], (now, key))
            if self._head_entry[cls] is None:
                self._dirty.add(cls)

    def on_remove(self, key) -> None:
        meta = self._meta.pop(key, None)
        if meta is None:
            return
        self._leave(key, meta)
        if key == self._pending:
            self._pending = None
            self._pending_queued = False

    def _leave(self, key, meta) -> None:
        """``key`` (its record popped) left by another way than ``victim``'s common case."""
        self._forget(meta[CLS], key)
        parent = self._detach(meta)
        if parent is not None:
            self._push(parent)
        self._cut_run(meta)

    def _detach(self, meta) -> list | None:
        """A block left: returns its resident parent's record if that parent has no child in the tier
        now (a leaf: a candidate again), else None.

        Children are counted by parent key whether or not the parent is resident, so a
        parent that leaves before its children (a reset, a failed copy, every leaf pinned)
        and comes back is still known to have them."""
        parent_key = meta[PARENT]
        if parent_key is None:
            return None
        kids = self._kids
        left = kids[parent_key] - 1
        if left:
            kids[parent_key] = left
            return None
        del kids[parent_key]
        return self._meta.get(parent_key)

    def _cut_run(self, meta) -> None:
        """A block left: if it was stored in the current run, the blocks stored before it are no longer
        the request's prefix and keep their class. (Leaf evictions never take one: the run's blocks
        all have a child but the pending one.)"""
        if self._young and meta[LAST] >= self._run_start:
            depth = meta[DEPTH]
            self._young = [node for node in self._young if node[DEPTH] > depth]

    def _rebuild(self) -> None:
        """Drop stale heap entries: one entry per resident leaf."""
        heaps = [[] for _ in self._heaps]
        kids = self._kids
        for key, meta in self._meta.items():
            if key not in kids:
                heaps[meta[CLS]].append((meta[LAST], key))
        for heap in heaps:
            heapify(heap)
        self._heaps = heaps
        self._dirty.update(range(len(heaps)))

    def _head(self, cls: int, now: int) -> None:
        """Find the least recently used leaf of ``cls`` (dropping stale entries) and its density."""
        heap, meta, kids = self._heaps[cls], self._meta, self._kids
        while heap:  # stale entries: evicted, used again, reclassified or no longer a leaf
            entry = heap[0]
            last, key = entry
            m = meta.get(key)
            if m is not None and m[LAST] == last and m[CLS] == cls and key not in kids:
                self._set_head(cls, entry, now)
                return
            heappop(heap)
        self._head_entry[cls] = None
        self._head_density[cls] = INF
        self._head_until[cls] = INF

    def _set_head(self, cls: int, entry: tuple, now: int) -> None:
        """``entry`` (a live leaf) heads ``cls``: its density at its age, and until when that holds."""
        last = entry[0]
        b = (now - last) >> self._shift
        if b >= 8:
            e = b.bit_length() - 3
            b = 4 * e + (b >> e)
        self._head_entry[cls] = entry
        if b >= self._last_bin:
            self._head_density[cls] = self._density[cls][self._last_bin]
            self._head_until[cls] = INF
        else:
            self._head_density[cls] = self._density[cls][b]
            until = self._head_until[cls] = last + self._edges[b + 1]
            if until < self._valid_until:
                self._valid_until = until

    def _refresh(self, now: int) -> None:
        """Bring the class heads up to date: those marked dirty, and those whose age crossed a bin."""
        dirty = self._dirty
        if now >= self._valid_until:
            dirty.update(cls for cls, until in enumerate(self._head_until) if until <= now)
        for cls in dirty:
            self._head(cls, now)
        dirty.clear()
        self._valid_until = min(self._head_until)

    def _candidate(self, can_evict):
        """(density, class, key) of the lowest-density evictable leaf, judged at the class heads, or None."""
        if self._dirty or self._now >= self._valid_until:
            self._refresh(self._now)
        density = min(self._head_density)
        if density == INF:
            if self._pending is not None and not self._pending_queued:
                self._queue_pending()  # the block being stored competes only when nothing else can go
                return self._candidate(can_evict)
            return None
        cls = self._head_density.index(density)
        key = self._head_entry[cls][1]
        if can_evict(key):
            return density, cls, key
        return self._candidate_pinned(can_evict)

    def _candidate_pinned(self, can_evict):
        """``_candidate`` when the best head is pinned (being loaded or stored): pinned heads are
        set aside for this call so the next leaf of their class competes; past a few of those,
        every resident block is ranked, leaves first."""
        if self._pending is not None and not self._pending_queued:
            self._queue_pending()
        held = []
        try:
            for _ in range(32):
                found = self._candidate(_anything)
                if found is None:
                    break
                if can_evict(found[2]):
                    return found
                held.append((found[1], heappop(self._heaps[found[1]])))
                self._dirty.add(found[1])
        finally:
            for cls, entry in held:
                heappush(self._heaps[cls], entry)
                self._dirty.add(cls)
        now, kids, bin_of = self._now, self._kids, self._bin
        best = best_rank = None
        for key, meta in self._meta.items():
            if can_evict(key):
                rank = (key in kids, self._density[meta[CLS]][bin_of(now - meta[LAST])], meta[LAST])
                if best_rank is None or rank < best_rank:
                    best, best_rank = (rank[1], meta[CLS], key), rank
        return best

    def victim(self, can_evict):
        now = self._now
        dirty = self._dirty
        if now >= self._valid_until or len(dirty) > 1:
            self._refresh(now)
        elif dirty:  # most often only the class of the last victim: look at its new head alone
            self._head(dirty.pop(), now)
        density = min(self._head_density)
        cls = self._head_density.index(density) if density != INF else -1
        if cls >= 0 and can_evict(self._head_entry[cls][1]):  # the common case of _candidate
            heap = self._heaps[cls]
            key = heap[0][1]
            meta = self._meta.pop(key)
            parent = self._detach(meta)
            if parent is not None and parent[CLS] == cls:
                # a cached prefix shrinks from its end: the parent is most often the class's next
                # head, so it takes the victim's heap entry and is looked at now, in one step
                entry = (parent[LAST], parent[KEY])
                heapreplace(heap, entry)
                if heap[0] is entry:  # no stale entry is older
                    self._set_head(cls, entry, now)
                else:
                    self._head(cls, now)
            else:
                heappop(heap)
                self._dirty.add(cls)
                if parent is not None:
                    self._push(parent)
        else:
            found = self._candidate(can_evict)
            if found is None:
                return None
            density, cls, key = found
            meta = self._meta.pop(key)
            self._leave(key, meta)
        self._threshold = density
        ghost = self._ghost  # a resident key is in neither generation
        seen = meta[SEEN]
        ghost[key] = (seen if seen < 255 else 255) | (cls + 1) << 8 | meta[LAST] << 16
        if len(ghost) >= self._ghost_half:
            self._expire(self._ghost_old)
            self._ghost_old = ghost
            self._ghost = {}
        if key == self._pending:
            self._pending = None
            self._pending_queued = False
        return key

    def __len__(self) -> int:
        return len(self._meta)

    # ------------------------------------------------------- for the admission

    def worth_admitting(self, key, block, request_tokens: int = 0) -> bool:
        """Whether ``block`` (not resident) is worth the slot of the current victim.

        True while the tier has room. Otherwise the best density of the block's
        class (at any age) must reach the victim's density; a refused block still
        counts as seen, so a prefix that keeps coming back climbs into a reuse
        class and gets in.
        """
        threshold = self._threshold  # the density of the last victim
        if threshold is None:
            found = self._candidate(_anything)
            threshold = self._threshold = found[0] if found is not None else 0.0
        if self._lowest_peak >= threshold or len(self._meta) < self.capacity_blocks:
            return True  # whatever its class, it is worth a slot now; or there is room
        cls = self._offered_class(key, block)
        if self._peak[cls] >= self._threshold:
            return True
        self.sighted(key, block, cls)
        return False

    def sighted(self, key, block, cls: int | None = None) -> None:
        """``key`` was offered but not stored: it still counts as seen, and as an access."""
        self._tick()
        if self._pending is not None:
            parent = block.parent
            # stored up to its parent and refused from here: the request did not end there
            self._end_of_request(tail=parent is None or parent.key != self._pending)
        self._remember(key, self._offered_class(key, block) if cls is None else cls)


def _anything(key) -> bool:
    return True
