"""Replicated volumes: a second copy of a disk on the peer node (no D-Bus here).

- ``bridge``: the data path on one node. On the source, a device-mapper ``raid1`` over the
  local disk and the peer's copy, which the kernel's NBD client reaches; on the target, the
  copy served by ``qemu-nbd``. Assembling is idempotent and adopts what a previous run of
  the daemon left running; the bitmap in the raid's metadata is the persistent intent log.
- ``states``: the mirror states with the reference's numbers, derived from what the kernel
  reports and what the administrator asked for.
- ``bitmap``: the intent bitmap read from a mirror's metadata: dirty regions, counted
  and merged.
"""
