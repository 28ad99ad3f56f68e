"""applianced: a controller that turns Linux servers into a highly available iSCSI SAN."""

__version__ = "0.1.0"
