"""Live takeover: a running page server hands its sockets and live forks to a new process.

- :mod:`~pagefork.takeover.protocol`: the versioned wire protocol (JSON + SCM_RIGHTS).
- :mod:`~pagefork.takeover.old`: the old side's listener and its failure handling.
- :mod:`~pagefork.takeover.new`: the new side (:func:`~pagefork.takeover.new.take_over`).
- :mod:`~pagefork.takeover.pageserver`: a page server's forks out of one process, into another.
- :mod:`~pagefork.takeover.serve`: ``pagefork serve --takeover``.
"""
