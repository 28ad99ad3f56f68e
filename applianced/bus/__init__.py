"""The D-Bus layer: a thin translation between the bus and the engine (``applianced.engine``)."""
