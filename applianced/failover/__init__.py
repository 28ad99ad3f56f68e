"""Active/passive failover of the pair: who serves, and the network side of serving.

The decision (``decision``) is a pure function of what the node observes; the network side
moves virtual addresses (``addresses``), announces them and asks whether one is in use
(``announce``), and asks the ping nodes whether this node still reaches the network
(``pingnode``). No D-Bus here: the bus layer and the engine drive this package.
"""
