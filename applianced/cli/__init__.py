"""``appliancectl``: the command-line client. It talks to applianced only over D-Bus."""
