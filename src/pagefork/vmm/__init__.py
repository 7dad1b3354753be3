"""VMM drivers: the side of the UFFD protocol that owns guest memory and runs vCPUs.

:mod:`pagefork.vmm.kvm` is a built-in KVM microVM, so the whole fork flow runs on any Linux box
with ``/dev/kvm`` and userfaultfd, without Firecracker.
"""
