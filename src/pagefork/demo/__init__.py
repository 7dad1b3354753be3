"""The built-in microVM's fork fan-out against a page server: what ``pagefork demo``, the tests
and the benchmarks share.

This sits above both the VMM layer (:mod:`pagefork.vmm.kvm`) and the page server
(:mod:`pagefork.server`): :mod:`.orchestrate` starts forks, hands their uffds to the server,
prefetches and collects per-fork figures; :mod:`.branch` snapshots a running fork and forks
the snapshot; :mod:`.density` runs a burst of forks alive together and measures their memory,
with and without KSM sharing. The VMM layer itself never imports the server.
"""
