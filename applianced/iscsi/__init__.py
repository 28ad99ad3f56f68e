"""The iSCSI target service on one node (no D-Bus here): what LIO serves and how.

- ``kernel/``: LIO as plain values (``model``), the plan between two of them (``plan``),
  and the backend that reads configfs and carries plans out (``lio``, ``configfs_actions``,
  ``rtslib_actions``); sessions and negotiated values read from the kernel.
- ``diskfile``: disk files and their 4 KiB identity trailer; ``devices``: block-device
  disks and what the node itself uses; ``presence``: disks whose backing is absent.
- ``firewall``: the nftables allow-lists on portals; ``initiators``: the recently seen
  initiators sampled from LIO; ``bootprofile``: DHCP settings for iSCSI boot firmware;
  ``targetcli``: migration from targetcli's saveconfig.json.

The engine (``applianced.engine``) drives these through its one commit path.
"""
