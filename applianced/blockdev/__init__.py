"""Block devices the node stacks under its disks, through the kernel's own interfaces.

- ``dm``: device-mapper ioctls (create, load, suspend/resume, remove, table, status).
- ``loop``: loop devices over disk files, with a size limit and direct I/O.

The target service stacks every disk on a device-mapper device of its own, and
replication re-points that device at a mirror under a live LUN; both use these modules.
"""
