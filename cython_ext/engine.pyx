# cython: language_level=3
"""engine.pyx: the base class of the blk worker's backing-store engines (see engine.pxd for the
seam's contract).  Owns nothing but the declaration's Python face.  Must not: know any store."""


cdef class QueueEngine:
    def stats(self):
        """Engine counters (plain integers the worker thread writes), merged into the worker's
        stats()."""
        return {}

    def close(self):
        """Release what the engine holds for its queue (the worker thread has returned)."""
