"""A minimal KVM microVM that plays the VMM side of Firecracker's UFFD protocol.

The parts are kept apart so that booting a real Linux kernel later adds code rather than
rewriting it:

- :mod:`.ioctls` the KVM kernel interface (ioctl numbers, structs, ``kvm_run``);
- :mod:`.vm`, :mod:`.vcpu` the VM and vCPU file descriptors, the ``KVM_RUN`` loop;
- :mod:`.memory` guest RAM, its userfaultfd and the handshake to the page server;
- :mod:`.devices` the port-I/O bus vCPU exits are dispatched to;
- :mod:`.cpustate` vCPU registers as JSON (the vmstate's vCPU part);
- :mod:`.guest` the hand-assembled guest program, :mod:`.trace` its access traces;
- :mod:`.template` building and loading templates (mem-file, vmstate, metadata);
- :mod:`.microvm` a fork: restore from a template, run; ``python -m pagefork.vmm.kvm`` runs one
  in its own process, :mod:`.process` drives that process;
- :mod:`.snapshot` diff snapshots of a stopped fork from KVM's dirty log.

Fanning forks out against a page server, and branching from a snapshot, sit a layer above
this one, in :mod:`pagefork.demo`: nothing here imports the page server.
"""

from pagefork.vmm.kvm.microvm import MicroVm, RunResult
from pagefork.vmm.kvm.template import Template, TemplateSpec, build_template, load_template
from pagefork.vmm.kvm.trace import TraceSpec

__all__ = [
    "MicroVm",
    "RunResult",
    "Template",
    "TemplateSpec",
    "TraceSpec",
    "build_template",
    "load_template",
]
