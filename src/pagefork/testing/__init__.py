"""Test helpers: a test VMM that speaks Firecracker's UFFD handshake from another process."""
