"""Client-side variable cache with a time-to-live.

Entries are reachable by variable name and by id.  An entry dies when its TTL
passes, when this client writes or deletes the variable, or when a watch event
for it arrives (``invalidate``).  An event carrying a version never lets an
older read be stored afterwards (``put`` ignores versions not newer than the
last invalidation), so a read racing a watch event cannot resurrect a stale
value.

Records go in and come out as copies (``snapshot``): a caller mutating what it
was handed (a list value, a record's version) never changes what later reads
get.
"""

import copy
import dataclasses
import threading
import time


def _copy_value(v):
    """A copy of a decoded value deep enough that mutating it is harmless.
    Values are scalars, flat lists (embeddings) or dicts of flat lists
    (tensors): a slice per list, not a generic deepcopy of every float."""
    if isinstance(v, list):
        if v and isinstance(v[0], (list, dict)):
            return [_copy_value(x) for x in v]
        return v[:]
    if isinstance(v, dict):
        return {k: _copy_value(x) for k, x in v.items()}
    return v


def snapshot(record):
    """A copy of a cached record the caller may mutate freely."""
    if dataclasses.is_dataclass(record) and not isinstance(record, type):
        changes = {f.name: (_copy_value(getattr(record, f.name)) if f.name == "value"
                            else copy.deepcopy(getattr(record, f.name)))
                   for f in dataclasses.fields(record)
                   if f.init and isinstance(getattr(record, f.name), (list, dict))}
        return dataclasses.replace(record, **changes)
    return copy.copy(record)


class VariableCache:
    """Thread-safe TTL cache of variable records keyed by name and id."""

    def __init__(self, ttl=5.0, clock=time.monotonic):
        self.ttl = float(ttl)
        self._clock = clock
        self._lock = threading.Lock()
        self._entries = {}      # key -> (record, expires_at)
        self._floor = {}        # key -> lowest version that may be cached
        self.hits = 0
        self.misses = 0

    @property
    def enabled(self):
        return self.ttl > 0

    def get(self, key):
        """The cached record for key (name or id), or None."""
        if not self.enabled:
            return None
        now = self._clock()
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry[1] <= now:
                if entry is not None:
                    self._drop_locked(entry[0])
                self.misses += 1
                return None
            self.hits += 1
            record = entry[0]
        return snapshot(record)

    def put(self, record):
        """Cache a record (anything with .name, .id and .version)."""
        if not self.enabled:
            return
        record = snapshot(record)  # the caller keeps (and may mutate) the original
        with self._lock:
            floor = max(self._floor.get(record.name, -1), self._floor.get(record.id, -1))
            if record.version < floor:
                return
            expires = self._clock() + self.ttl
            for key in (record.name, record.id):
                if key:
                    self._entries[key] = (record, expires)

    def invalidate(self, key, min_version=None):
        """Forget key (and the other key of its record).

        min_version, when known (a watch event's version), also refuses later
        puts of records older than it.
        """
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._drop_locked(entry[0])
            self._entries.pop(key, None)
            if min_version is not None:
                keys = [key] + ([entry[0].name, entry[0].id] if entry else [])
                for k in keys:
                    if k and self._floor.get(k, -1) < min_version:
                        self._floor[k] = min_version

    def forget(self, key):
        """Forget key entirely (after delete): also drop its version floor."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._drop_locked(entry[0])
                self._floor.pop(entry[0].name, None)
                self._floor.pop(entry[0].id, None)
            self._entries.pop(key, None)
            self._floor.pop(key, None)

    def clear(self):
        with self._lock:
            self._entries.clear()
            self._floor.clear()

    def __len__(self):
        with self._lock:
            return len({id(e[0]) for e in self._entries.values()})

    def _drop_locked(self, record):
        for k in (record.name, record.id):
            cur = self._entries.get(k)
            if cur is not None and cur[0] is record:
                del self._entries[k]
